"""InteractionGraph: the typed multigraph of feature interactions as two Arrow tables and a manifest.

Nodes are SAE features ``(site, feature)``. Edges are excitatory, inhibitory or gating; a gating
row is the hyperedge ``(source, modulator -> target)``. The tables are the source of truth;
``to_networkx`` is a view for graph algorithms (see docs/graph_format.md for both).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

import networkx as nx
from treescope import repr_lib

from ..errors import FormatError, JfigError
from ..sites import sort_sites
from .export import write_graphml, write_node_link_json
from .storage import MANIFEST_KEYS, STORAGE_KEYS, read_graph_folder, write_graph_folder

KINDS = ("excitatory", "inhibitory", "gating")
ESTIMATORS = ("clamp", "ablate", "mean_ablate", "jacobian", "jacobian_direct", "mixed", "factorial", "conditional")
POSITIONS = ("same", "later", "all")

EDGE_SCHEMA = pa.schema([
    ("source_site", pa.string()), ("source", pa.int64()),
    ("target_site", pa.string()), ("target", pa.int64()),
    ("kind", pa.string()),            # 'excitatory' | 'inhibitory' | 'gating'
    ("weight", pa.float64()),         # signed mean effect (gating: the gating statistic)
    ("p_value", pa.float64()),        # raw
    ("p_bonferroni", pa.float64()),
    ("q_value", pa.float64()),        # Benjamini-Hochberg
    ("variance", pa.float64()),       # of the per-input effects
    ("n", pa.int64()),                # inputs averaged
    ("estimator", pa.string()),       # one of ESTIMATORS
    ("positions", pa.string()),       # 'same' | 'later' | 'all'
    ("source_layer", pa.int64()), ("target_layer", pa.int64()),
    ("modulator_site", pa.string()), ("modulator", pa.int64()),   # null unless kind == 'gating'
    ("cv", pa.float64()),             # std/|mean| of the per-input effects (first order; null if unknown)
    ("gating_flag", pa.bool_()),      # cv > the build's flag threshold: possibly gated (first order; null if unknown)
])
# Columns added after the first release: a table without them (an older graph folder) gets them as nulls.
OPTIONAL_EDGE_COLUMNS = ("cv", "gating_flag")
NODE_SCHEMA = pa.schema([
    ("site", pa.string()), ("feature", pa.int64()), ("layer", pa.int64()),
    ("firing_rate", pa.float64()),    # null if unknown
    ("label", pa.string()),           # null ok
    ("top_contexts", pa.string()),    # JSON list of {"text": str, "activation": float}; null ok
])
_EDGE_NOT_NULL = ("source_site", "source", "target_site", "target", "kind", "weight", "n", "estimator",
                  "positions", "source_layer", "target_layer")
_NODE_NOT_NULL = ("site", "feature", "layer")


def library_versions() -> dict[str, str]:
    """Installed versions of jfig and the libraries whose behaviour a graph depends on."""
    out = {}
    for name in ("jfig", "jax", "numpy", "pyarrow", "networkx"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def node_id(site: str, feature: int) -> str:
    """The NetworkX node id of a feature: ``"site:feature"``."""
    return f"{site}:{feature}"


def gate_id(source_site: str, source: int, modulator_site: str, modulator: int, target_site: str, target: int) -> str:
    """The NetworkX node id of a gating hyperedge (a repeated triple gets ``#1``, ``#2``, ... appended)."""
    return f"gate:{source_site}:{source}|{modulator_site}:{modulator}->{target_site}:{target}"


@dataclass(frozen=True, eq=True, repr=False)
class InteractionGraph:
    """A feature interaction graph: ``nodes`` and ``edges`` (pyarrow Tables) and a JSON-able ``manifest``.

    Construction conforms both tables to ``NODE_SCHEMA`` / ``EDGE_SCHEMA`` (columns in that order,
    lossless casts; extra columns are kept after them) and validates them, so every instance is a
    well-formed graph. Methods return new objects; nothing mutates.
    """

    nodes: pa.Table
    edges: pa.Table
    manifest: dict

    def __post_init__(self):
        nodes = _conform(self.nodes, NODE_SCHEMA, "nodes")
        edges = _conform(self.edges, EDGE_SCHEMA, "edges")
        manifest = _conform_manifest(self.manifest)
        _validate_nodes(nodes, manifest)
        _validate_edges(edges, nodes)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "manifest", manifest)

    @classmethod
    def from_tables(cls, nodes, edges, manifest: dict | None = None) -> "InteractionGraph":
        """Build and validate a graph. ``nodes``/``edges``: pyarrow Tables or dicts of columns.

        Missing manifest keys get defaults (``library_versions`` and ``created`` from now); the
        storage keys (format, format_version, n_nodes, n_edges) are dropped, as they describe files.
        """
        return cls(nodes, edges, {} if manifest is None else manifest)

    # ---- counts and queries -------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return self.nodes.num_rows

    @property
    def n_edges(self) -> int:
        return self.edges.num_rows

    def edges_by_kind(self) -> dict[str, int]:
        """Edge counts for every kind, zeros included, in the order of ``KINDS``."""
        counts = dict.fromkeys(KINDS, 0)
        for row in pc.value_counts(self.edges["kind"]).to_pylist():
            counts[row["values"]] = row["counts"]
        return counts

    def strongest(self, k: int = 10, kind: str | None = None) -> pa.Table:
        """The ``k`` edge rows with the largest ``|weight|`` (of one ``kind`` if given), strongest first."""
        edges = self.edges if kind is None else self.edges.filter(pc.equal(self.edges["kind"], _check_kind(kind)))
        if k < 0:
            raise JfigError(f"strongest: k must be >= 0, got {k}")
        order = pc.array_sort_indices(pc.abs(edges["weight"]), order="descending", null_placement="at_end")
        return edges.take(order[:k])

    def subgraph(self, sites: Iterable[str] | str | None = None,
                 features: Iterable[tuple[str, int]] | None = None,
                 kinds: Iterable[str] | str | None = None) -> "InteractionGraph":
        """The graph on the nodes at ``sites`` and among ``features`` ((site, feature) pairs), keeping
        edges of ``kinds`` whose endpoints (and modulator) all survive. ``None`` keeps everything."""
        keep = pa.array([True] * self.n_nodes, pa.bool_())
        if sites is not None:
            sites = [sites] if isinstance(sites, str) else list(sites)
            keep = pc.and_(keep, pc.is_in(self.nodes["site"], value_set=pa.array(sites, pa.string())))
        if features is not None:
            features = [[s, int(f)] for s, f in features]
            wanted = pa.array([node_id(s, f) for s, f in features], pa.string())
            keep = pc.and_(keep, pc.is_in(_keys(self.nodes["site"], self.nodes["feature"]), value_set=wanted))
        nodes = self.nodes.filter(keep)
        node_keys = _keys(nodes["site"], nodes["feature"])
        e = self.edges
        ok = pc.and_(pc.is_in(_keys(e["source_site"], e["source"]), value_set=node_keys),
                     pc.is_in(_keys(e["target_site"], e["target"]), value_set=node_keys))
        ok = pc.and_(ok, pc.or_(pc.is_null(e["modulator"]),
                                pc.is_in(_keys(e["modulator_site"], e["modulator"]), value_set=node_keys)))
        if kinds is not None:
            kinds = [_check_kind(x) for x in ([kinds] if isinstance(kinds, str) else kinds)]
            ok = pc.and_(ok, pc.is_in(e["kind"], value_set=pa.array(kinds, pa.string())))
        picked = {"sites": sites, "features": features, "kinds": kinds}
        return InteractionGraph(nodes, e.filter(ok), {**self.manifest, "subgraph": picked})

    def with_labels(self, labels) -> "InteractionGraph":
        """A copy whose node table's `label` column holds `labels` ({(site, feature): text}, e.g. from
        `jfig.graph.load_labels`) where given; other nodes keep their label. JfigError when no label
        names a node of the graph (a mismatched file)."""
        labels = {(str(s), int(f)): (None if t is None else str(t)) for (s, f), t in dict(labels).items()}
        keys = list(zip(self.nodes["site"].to_pylist(), self.nodes["feature"].to_pylist()))
        hit = sum(k in labels for k in keys)
        if labels and not hit:
            some = next(iter(labels))
            raise JfigError(f"none of the {len(labels)} labels names a node of this graph (e.g. {some[0]}#{some[1]}; "
                            f"the graph's sites are {sorted(set(s for s, _ in keys))})")
        old = self.nodes["label"].to_pylist()
        new = pa.array([labels.get(k, o) for k, o in zip(keys, old)], pa.string())
        nodes = self.nodes.set_column(self.nodes.schema.get_field_index("label"), "label", new)
        return InteractionGraph(nodes, self.edges, self.manifest)

    def summary(self) -> str:
        """A few lines: nodes per site, edges by kind, and edge counts per (source layer -> target layer)."""
        sites = pc.value_counts(self.nodes["site"]).to_pylist()
        lines = [f"InteractionGraph: {self.n_nodes} nodes on {len(sites)} sites, {self.n_edges} edges"
                 + (f" (model {self.manifest['model']})" if self.manifest.get("model") else "")]
        lines.append("  nodes: " + (", ".join(f"{r['values']} {r['counts']}" for r in sites) or "none"))
        lines.append("  edges: " + ", ".join(f"{k} {v}" for k, v in self.edges_by_kind().items()))
        pairs = self.edges.group_by(["source_layer", "target_layer"]).aggregate([("kind", "count")]).to_pylist()
        pairs.sort(key=lambda r: (r["source_layer"], r["target_layer"]))
        lines.append("  layer pairs: " + (", ".join(f"{r['source_layer']}->{r['target_layer']} {r['kind_count']}"
                                                     for r in pairs) or "none"))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary().splitlines()[0]

    def __treescope_repr__(self, path, subtree_renderer):
        """Notebook display (treescope): counts per site and kind and the strongest edges, not two tables."""
        counts = {r["values"]: r["counts"] for r in pc.value_counts(self.nodes["site"]).to_pylist()}
        sites = sort_sites(list(counts))
        strongest = [f"{r['source_site']}#{r['source']} -> {r['target_site']}#{r['target']}: {r['kind']} "
                     f"{r['weight']:.3g}" + (f" (modulator {r['modulator_site']}#{r['modulator']})"
                                              if r["modulator"] is not None else "")
                     for r in self.strongest(5).to_pylist()]
        summary = {"n_nodes": self.n_nodes, "n_edges": self.n_edges, "edges_by_kind": self.edges_by_kind(),
                   "nodes_per_site": {s: counts[s] for s in sites}, "strongest_edges": strongest,
                   "model": self.manifest.get("model"), "options": self.manifest.get("options") or {}}
        return repr_lib.render_object_constructor(type(self), summary, path=None, subtree_renderer=subtree_renderer)

    # ---- views and files ------------------------------------------------------------------------

    def to_networkx(self):
        """A ``networkx.MultiDiGraph``. Feature nodes are ``"site:feature"`` (kind='feature'); an
        excitatory/inhibitory row is an edge carrying the row's columns; a gating row becomes a
        node ``gate_id(...)`` (kind='gate', the row's columns) with edges source->gate
        (role='input'), modulator->gate (role='modulator') and gate->target (role='output')."""
        g = nx.MultiDiGraph(manifest=json.loads(json.dumps(self.manifest)))
        g.add_nodes_from((node_id(row["site"], row["feature"]), {"kind": "feature", **row})
                         for row in _rows(self.nodes))
        plain = self.edges.filter(pc.not_equal(self.edges["kind"], "gating"))
        g.add_edges_from((node_id(row["source_site"], row["source"]), node_id(row["target_site"], row["target"]), row)
                         for row in _rows(plain.drop_columns(["modulator_site", "modulator"])))
        seen: dict[str, int] = {}
        for row in _rows(self.edges.filter(pc.equal(self.edges["kind"], "gating"))):
            gate = gate_id(row["source_site"], row["source"], row["modulator_site"], row["modulator"],
                           row["target_site"], row["target"])
            repeat = seen.get(gate, 0)
            seen[gate] = repeat + 1
            gate = gate if repeat == 0 else f"{gate}#{repeat}"
            g.add_node(gate, **{**row, "kind": "gate"})
            g.add_edge(node_id(row["source_site"], row["source"]), gate, kind="gating", role="input")
            g.add_edge(node_id(row["modulator_site"], row["modulator"]), gate, kind="gating", role="modulator")
            g.add_edge(gate, node_id(row["target_site"], row["target"]), kind="gating", role="output")
        return g

    def save(self, path) -> None:
        """Write ``nodes.parquet``, ``edges.parquet`` and ``manifest.json`` into the folder ``path``
        atomically (see ``jfig.graph.storage.write_graph_folder``)."""
        write_graph_folder(path, self.nodes, self.edges, self.manifest)

    def to_graphml(self, path) -> None:
        """Write ``to_networkx()`` as GraphML (nulls become "" for strings and NaN for numbers)."""
        types = {f.name: f.type for f in (*self.nodes.schema, *self.edges.schema)}
        write_graphml(self.to_networkx(), types, path)

    def to_node_link_json(self, path) -> None:
        """Write ``to_networkx()`` as node-link JSON (edges under the key "edges"; NaN becomes null)."""
        write_node_link_json(self.to_networkx(), path)


def save_graph(graph: InteractionGraph, path) -> None:
    """``graph.save(path)``."""
    graph.save(path)


def load_graph(path) -> InteractionGraph:
    """Read and validate a graph folder written by ``InteractionGraph.save``.

    Raises ``FormatError`` naming the folder or file for: a missing folder or file, a manifest that
    is not JSON, lacks keys or has another format/version, an unreadable (e.g. truncated) Parquet
    file, row counts that disagree with the manifest, or tables that break the schema.
    """
    nodes, edges, manifest = read_graph_folder(path)
    try:
        return InteractionGraph.from_tables(nodes, edges, manifest)
    except FormatError:
        raise
    except JfigError as e:
        raise FormatError(f"{path}: {e}") from None


# ---- conforming and validating --------------------------------------------------------------------

def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise JfigError(f"unknown edge kind {kind!r}; expected one of {list(KINDS)}")
    return kind


def _rows(table: pa.Table):
    """The rows of ``table`` as dicts (column-wise conversion: much faster than ``to_pylist``)."""
    names = table.column_names
    return (dict(zip(names, values)) for values in zip(*(table[n].to_pylist() for n in names)))


def _keys(site: pa.ChunkedArray, feature: pa.ChunkedArray) -> pa.ChunkedArray:
    """``"site:feature"`` strings, elementwise (null where either is null)."""
    return pc.binary_join_element_wise(site, pc.cast(feature, pa.string()), ":")


def _is_stringish(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)   # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _conform(table, schema: pa.Schema, what: str) -> pa.Table:
    """Columns of ``schema`` in order (lossless casts only), then any extra columns; no schema metadata."""
    if isinstance(table, dict):
        table = pa.table(table)
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise JfigError(f"{what} must be a pyarrow.Table or a dict of columns, got {type(table).__name__}")
    names = table.column_names
    if len(set(names)) != len(names):
        raise JfigError(f"{what} table has duplicate column names {sorted({n for n in names if names.count(n) > 1})}")
    optional = OPTIONAL_EDGE_COLUMNS if schema is EDGE_SCHEMA else ()
    missing = [f.name for f in schema if f.name not in names and f.name not in optional]
    if missing:
        raise JfigError(f"{what} table lacks column(s) {missing}; expected columns {schema.names}")
    arrays, fields = [], []
    for field in schema:
        col = table[field.name] if field.name in names else pa.chunked_array([pa.nulls(table.num_rows, field.type)])
        arrays.append(_cast_column(col, field, what))
        fields.append(field)
    for name in names:
        if name not in schema.names:
            arrays.append(table[name])
            fields.append(table.schema.field(name).remove_metadata())
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _cast_column(col: pa.ChunkedArray, field: pa.Field, what: str) -> pa.ChunkedArray:
    """``col`` as ``field.type``: strings from string-like columns, numbers from numeric ones. Arrow's
    safe cast refuses any value change (fractions, NaN or overflow to int64; ints beyond 2**53 to float64)."""
    have, want = col.type, field.type
    if have == want:
        return col
    numeric = pa.types.is_integer(have) or pa.types.is_floating(have)
    ok = pa.types.is_null(have) or (_is_stringish(have) if pa.types.is_string(want) else numeric)
    err = f"{what} column {field.name!r} has type {have}; expected {want}"
    if not ok:
        raise JfigError(err)
    try:
        return col.cast(want, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise JfigError(f"{err} and cannot be cast losslessly: {e}") from None


def _conform_manifest(manifest) -> dict:
    if not isinstance(manifest, dict):
        raise JfigError(f"manifest must be a dict, got {type(manifest).__name__}")
    try:
        out = json.loads(json.dumps(manifest, allow_nan=False))   # deep copy; tuples become lists
    except (TypeError, ValueError) as e:
        raise JfigError(f"manifest must be JSON-serialisable: {e}") from None
    for key in STORAGE_KEYS:
        out.pop(key, None)
    defaults = {"model": None, "saes": [], "corpus_hash": None, "options": {},
                "library_versions": library_versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for key in MANIFEST_KEYS:
        out.setdefault(key, defaults[key])
    if not isinstance(out["saes"], list) or not all(isinstance(s, dict) and isinstance(s.get("site"), str)
                                                    for s in out["saes"]):
        raise JfigError("manifest['saes'] must be a list of dicts, each with a 'site' name")
    return out


def _first_bad(mask: pa.ChunkedArray) -> int:
    """Row index of the first true value of ``mask`` (nulls count as false), or -1."""
    return pc.index(pc.fill_null(mask, False), True).as_py()


def _require(table: pa.Table, what: str, mask, message: str) -> None:
    """Raise if any row of boolean ``mask`` is true; the message names the first such row."""
    row = _first_bad(mask)
    if row >= 0:
        raise JfigError(f"{what} row {row}: {message} (row: {table.slice(row, 1).to_pylist()[0]})")


def _check_values(table: pa.Table, what: str, column: str, allowed: tuple[str, ...]) -> None:
    bad = pc.invert(pc.is_in(table[column], value_set=pa.array(allowed, pa.string())))
    unknown = sorted(set(table[column].filter(pc.fill_null(bad, False)).to_pylist()))
    if unknown:
        raise JfigError(f"{what} column {column!r} has unknown value(s) {unknown}; expected one of {list(allowed)}")


def _check_not_null(table: pa.Table, what: str, columns: tuple[str, ...]) -> None:
    for name in columns:
        if table[name].null_count:
            _require(table, what, pc.is_null(table[name]), f"column {name!r} is null")


def _validate_nodes(nodes: pa.Table, manifest: dict) -> None:
    _check_not_null(nodes, "nodes", _NODE_NOT_NULL)
    _require(nodes, "nodes", pc.less(nodes["feature"], 0), "feature index is negative")
    _require(nodes, "nodes", pc.less(nodes["firing_rate"], 0), "firing_rate is negative")
    keys = _keys(nodes["site"], nodes["feature"])
    if pc.count_distinct(keys).as_py() != nodes.num_rows:
        dup = pc.value_counts(keys).filter(pc.greater(pc.value_counts(keys).field("counts"), 1))
        raise JfigError(f"nodes table lists feature(s) more than once: {dup.field('values').to_pylist()[:5]}")
    layers = nodes.group_by("site").aggregate([("layer", "count_distinct")])
    multi = layers.filter(pc.greater(layers["layer_count_distinct"], 1))["site"].to_pylist()
    if multi:
        raise JfigError(f"nodes table gives site(s) {multi} more than one layer; a site has one layer")
    for row, text in enumerate(nodes["top_contexts"].to_pylist()):
        if text is None:
            continue
        try:
            ok = isinstance(json.loads(text), list)
        except ValueError:
            ok = False
        if not ok:
            raise JfigError(f"nodes row {row}: top_contexts must be a JSON list of {{'text', 'activation'}} "
                            f"objects, got {text[:80]!r}")
    if manifest["saes"]:
        d_sae = {s["site"]: s.get("d_sae") for s in manifest["saes"]}
        unknown = sorted(set(nodes["site"].to_pylist()) - set(d_sae))
        if unknown:
            raise JfigError(f"nodes at site(s) {unknown} have no SAE in manifest['saes'] (sites {sorted(d_sae)})")
        for site, width in d_sae.items():
            if isinstance(width, int):
                at = pc.and_(pc.equal(nodes["site"], site), pc.greater_equal(nodes["feature"], width))
                _require(nodes, "nodes", at, f"feature index is >= d_sae {width} of the SAE at {site}")


def _validate_edges(edges: pa.Table, nodes: pa.Table) -> None:
    _check_not_null(edges, "edges", _EDGE_NOT_NULL)
    _check_values(edges, "edges", "kind", KINDS)
    _check_values(edges, "edges", "estimator", ESTIMATORS)
    _check_values(edges, "edges", "positions", POSITIONS)
    gating = pc.equal(edges["kind"], "gating")
    has_mod = pc.or_(pc.is_valid(edges["modulator_site"]), pc.is_valid(edges["modulator"]))
    _require(edges, "edges", pc.and_(gating, pc.or_(pc.is_null(edges["modulator_site"]),
                                                    pc.is_null(edges["modulator"]))),
             "a gating edge needs modulator_site and modulator")
    _require(edges, "edges", pc.and_(pc.invert(gating), has_mod), "modulator_site/modulator must be null unless gating")
    for name in ("source", "target", "modulator", "n"):
        _require(edges, "edges", pc.less(edges[name], 0), f"{name} is negative")
    for name in ("p_value", "p_bonferroni", "q_value"):
        _require(edges, "edges", pc.or_(pc.less(edges[name], 0), pc.greater(edges[name], 1)), f"{name} outside [0, 1]")
    _require(edges, "edges", pc.less(edges["variance"], 0), "variance is negative")
    _require(edges, "edges", pc.less(edges["cv"], 0), "cv is negative")
    _require(edges, "edges", pc.and_(gating, pc.or_(pc.is_valid(edges["cv"]), pc.is_valid(edges["gating_flag"]))),
             "cv/gating_flag must be null on a gating edge (they describe first-order edges)")

    node_keys = _keys(nodes["site"], nodes["feature"])
    for end, layer in (("source", "source_layer"), ("target", "target_layer"), ("modulator", None)):
        keys = _keys(edges[f"{end}_site"], edges[end])
        where = pc.index_in(keys, value_set=node_keys)
        row = _first_bad(pc.and_(pc.is_null(where), pc.is_valid(keys)))
        if row >= 0:
            raise JfigError(f"edges row {row}: {end} {keys[row].as_py()!r} is not in the nodes table "
                            f"(row: {edges.slice(row, 1).to_pylist()[0]})")
        if layer is not None:
            node_layer = pc.take(nodes["layer"], where)
            _require(edges, "edges", pc.not_equal(edges[layer], node_layer),
                     f"{layer} disagrees with the layer of its node in the nodes table")
