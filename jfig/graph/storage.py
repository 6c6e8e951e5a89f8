"""Graph storage: a folder of two Parquet files and a JSON manifest, written atomically.

Layout of a graph folder (docs/graph_format.md has the schemas):

    nodes.parquet     one row per feature, NODE_SCHEMA
    edges.parquet     one row per edge, EDGE_SCHEMA
    manifest.json     format "jfig-graph", format_version, n_nodes, n_edges, model, saes, corpus_hash,
                      options, library_versions, created
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.files import atomic_folder
from ..errors import FormatError, JfigError

FORMAT, FORMAT_VERSION = "jfig-graph", 1
NODES_FILE, EDGES_FILE, MANIFEST_FILE = "nodes.parquet", "edges.parquet", "manifest.json"
MANIFEST_KEYS = ("model", "saes", "corpus_hash", "options", "library_versions", "created")
# Keys the storage layer adds to manifest.json; InteractionGraph.manifest never holds them.
STORAGE_KEYS = ("format", "format_version", "n_nodes", "n_edges")


def write_graph_folder(path, nodes: pa.Table, edges: pa.Table, manifest: dict) -> None:
    """Write the tables and manifest to the folder ``path``.

    The files are written and fsynced in a temporary folder beside ``path``, which is then renamed
    into place, so a crash never leaves a half-written graph. An existing ``path`` is replaced only
    if it is empty or a jfig graph folder (its manifest.json says ``"format": "jfig-graph"``).
    """
    path = Path(path)
    if path.exists():
        _check_replaceable(path)
    with atomic_folder(path) as tmp:
        pq.write_table(nodes, tmp / NODES_FILE)
        pq.write_table(edges, tmp / EDGES_FILE)
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_nodes": nodes.num_rows,
                "n_edges": edges.num_rows, **manifest}
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=1, allow_nan=False))


def read_graph_folder(path) -> tuple[pa.Table, pa.Table, dict]:
    """(nodes, edges, manifest) of a graph folder written by ``write_graph_folder``; the manifest
    without the storage keys. ``InteractionGraph`` validates the tables against the schema.

    Raises ``FormatError`` naming the folder or file for: a missing folder or file, a manifest that
    is not JSON, lacks keys or has another format/version, an unreadable (e.g. truncated) Parquet
    file, or row counts that disagree with the manifest.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"graph folder {path} does not exist or is not a folder")
    for name in (MANIFEST_FILE, NODES_FILE, EDGES_FILE):
        if not (path / name).is_file():
            raise FormatError(f"{path / name} is missing; a jfig graph folder holds "
                              f"{NODES_FILE}, {EDGES_FILE} and {MANIFEST_FILE}")
    manifest = _read_manifest(path / MANIFEST_FILE)
    tables = {}
    for name, count_key in ((NODES_FILE, "n_nodes"), (EDGES_FILE, "n_edges")):
        try:
            table = pq.read_table(path / name)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise FormatError(f"{path / name} is not a readable Parquet file (truncated or corrupt?): {e}") from None
        if table.num_rows != manifest[count_key]:
            raise FormatError(f"{path / name} has {table.num_rows} rows but {MANIFEST_FILE} records "
                              f"{count_key}={manifest[count_key]}; the folder is incomplete or mixed")
        tables[name] = table.replace_schema_metadata(None)
    return tables[NODES_FILE], tables[EDGES_FILE], {k: v for k, v in manifest.items() if k not in STORAGE_KEYS}


def _check_replaceable(path: Path) -> None:
    if not path.is_dir():
        raise JfigError(f"{path} exists and is not a folder; refusing to replace it with a graph folder")
    if not any(path.iterdir()):
        return
    try:
        fmt = json.loads((path / MANIFEST_FILE).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT:
        raise JfigError(f"{path} exists and is not a jfig graph folder (no {MANIFEST_FILE} with "
                        f'"format": "{FORMAT}"); refusing to replace it')


def _read_manifest(file: Path) -> dict:
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{file} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise FormatError(f"{file}: format is {manifest.get('format')!r}; expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise FormatError(f"{file}: format_version is {version!r}; this jfig reads version {FORMAT_VERSION}"
                          + (" (written by a newer jfig)" if newer else ""))
    missing = [k for k in (*STORAGE_KEYS, *MANIFEST_KEYS) if k not in manifest]
    if missing:
        raise FormatError(f"{file} lacks key(s) {missing}")
    for key in ("n_nodes", "n_edges"):
        if not isinstance(manifest[key], int) or manifest[key] < 0:
            raise FormatError(f"{file}: {key} must be a non-negative integer, got {manifest[key]!r}")
    return manifest
