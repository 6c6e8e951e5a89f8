"""Graph storage (a folder of two Parquet files and a JSON manifest) and GraphML / node-link export.

Layout of a graph folder (docs/graph_format.md has the schemas):

    nodes.parquet     one row per feature, NODE_SCHEMA
    edges.parquet     one row per edge, EDGE_SCHEMA
    manifest.json     format "jfig-graph", format_version, n_nodes, n_edges, model, saes, corpus_hash,
                      options, library_versions, created
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError, JfigError
from .graph import MANIFEST_KEYS, STORAGE_KEYS, InteractionGraph

FORMAT, FORMAT_VERSION = "jfig-graph", 1
NODES_FILE, EDGES_FILE, MANIFEST_FILE = "nodes.parquet", "edges.parquet", "manifest.json"
LINKS_KEY = "edges"   # the node-link JSON key holding the edges, whatever networkx's default is
# Link endpoints go under "from"/"to": an edge row already has attributes named "source" and "target".
_LINK_NAMES = {"source": "from", "target": "to", "key": "key", "name": "id"}
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")   # chars XML 1.0 cannot hold


def save_graph(graph: InteractionGraph, path) -> None:
    """Write ``graph`` to the folder ``path``.

    The files are written and fsynced in a temporary folder beside ``path``, which is then renamed
    into place, so a crash never leaves a half-written graph. An existing ``path`` is replaced only
    if it is empty or a jfig graph folder (its manifest.json says ``"format": "jfig-graph"``).
    """
    path = Path(path)
    if path.exists():
        _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        pq.write_table(graph.nodes, tmp / NODES_FILE)
        pq.write_table(graph.edges, tmp / EDGES_FILE)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_nodes": graph.n_nodes,
                    "n_edges": graph.n_edges, **graph.manifest}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, allow_nan=False))
        for name in (NODES_FILE, EDGES_FILE, MANIFEST_FILE):
            _fsync(tmp / name)
        _fsync(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_graph(path) -> InteractionGraph:
    """Read and validate a graph folder written by ``InteractionGraph.save``.

    Raises ``FormatError`` naming the folder or file for: a missing folder or file, a manifest that
    is not JSON, lacks keys or has another format/version, an unreadable (e.g. truncated) Parquet
    file, row counts that disagree with the manifest, or tables that break the schema.
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
    try:
        return InteractionGraph.from_tables(tables[NODES_FILE], tables[EDGES_FILE],
                                            {k: v for k, v in manifest.items() if k not in STORAGE_KEYS})
    except FormatError:
        raise
    except JfigError as e:
        raise FormatError(f"{path}: {e}") from None


def write_graphml(graph: InteractionGraph, path) -> None:
    """``graph.to_networkx()`` as GraphML. GraphML has no null: null strings become "", null numbers
    NaN (an integer column with nulls, which only extra columns can have, loses the attribute);
    characters XML 1.0 cannot hold (control characters) become U+FFFD; the manifest is stored as a
    JSON string in the graph attribute ``manifest``."""
    import networkx as nx

    g = graph.to_networkx()
    bad_ids = {n: _NOT_XML.sub("\ufffd", n) for n in g if _NOT_XML.search(n)}
    if bad_ids:
        g = nx.relabel_nodes(g, bad_ids)
    types = {f.name: f.type for f in (*graph.nodes.schema, *graph.edges.schema)}
    g.graph["manifest"] = json.dumps(g.graph["manifest"])
    for _, data in g.nodes(data=True):
        _graphml_safe(data, types)
    for _, _, data in g.edges(data=True):
        _graphml_safe(data, types)
    nx.write_graphml(g, str(path), infer_numeric_types=True)


def write_node_link_json(graph: InteractionGraph, path) -> None:
    """``graph.to_networkx()`` as node-link JSON: nodes under "nodes" (id "id"), edges under "edges"
    with endpoints "from"/"to" and multigraph key "key"; NaN and infinities are written as null (JSON has neither)."""
    import networkx as nx

    g = graph.to_networkx()
    try:
        data = nx.node_link_data(g, edges=LINKS_KEY, **_LINK_NAMES)
    except TypeError:   # networkx < 3.4 calls the argument ``link``
        data = nx.node_link_data(g, link=LINKS_KEY, **_LINK_NAMES)
    Path(path).write_text(json.dumps(_nonfinite_to_none(data), allow_nan=False))


def read_node_link_json(path):
    """The ``networkx.MultiDiGraph`` of a file written by ``write_node_link_json``."""
    import networkx as nx

    data = json.loads(Path(path).read_text())
    try:
        return nx.node_link_graph(data, directed=True, multigraph=True, edges=LINKS_KEY, **_LINK_NAMES)
    except TypeError:
        return nx.node_link_graph(data, directed=True, multigraph=True, link=LINKS_KEY, **_LINK_NAMES)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _graphml_safe(data: dict, types: dict) -> None:
    for key, value in list(data.items()):
        t = types.get(key)
        if value is None:
            if t is not None and pa.types.is_floating(t):
                data[key] = math.nan
            elif t is not None and pa.types.is_integer(t):
                del data[key]
            else:
                data[key] = ""
        elif isinstance(value, (list, dict)):
            data[key] = json.dumps(value)
        elif isinstance(value, str) and _NOT_XML.search(value):
            data[key] = _NOT_XML.sub("\ufffd", value)


def _nonfinite_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nonfinite_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nonfinite_to_none(v) for v in x]
    return x
