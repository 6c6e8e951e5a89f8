"""Two graphs of the same SAEs compared edge by edge: gained, lost, sign-flipped or the same.

An edge is identified by (source, target, modulator, positions): the kind's sign is what can flip.
Graphs built with the same SAEs on two models, two corpora or two sets of options line up feature
by feature; graphs whose SAEs differ in width at a shared site cannot, and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..errors import JfigError

STATUSES = ("same", "gained", "lost", "flipped")
KEY_COLUMNS = ("source_site", "source", "target_site", "target", "modulator_site", "modulator", "positions")


@dataclass(frozen=True, eq=False)
class GraphDiff:
    """``table``: one row per edge of either graph, with the key columns, ``status`` (one of
    STATUSES), ``kind_a``/``kind_b``, ``weight_a``/``weight_b`` (null where absent) and
    ``p_value_a``/``p_value_b``; ``counts``: rows per status; ``notes``: what the comparison
    could not line up (sites in one graph only, SAEs whose fingerprints differ, duplicate keys)."""

    table: pa.Table
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.counts
        return (f"{c['same']} same, {c['gained']} gained, {c['lost']} lost, {c['flipped']} sign-flipped "
                f"({self.table.num_rows} edges in either graph)")


def sae_notes(a, b) -> list[str]:
    """What differs between the SAEs of two graphs' manifests; JfigError when a shared site's SAEs
    have different widths (their feature ids cannot be compared)."""
    sa = {s["site"]: s for s in a.manifest.get("saes", [])}
    sb = {s["site"]: s for s in b.manifest.get("saes", [])}
    notes = []
    for site in sorted(set(sa) & set(sb)):
        if sa[site].get("d_sae") != sb[site].get("d_sae"):
            raise JfigError(f"the graphs' SAEs at {site} differ in width ({sa[site].get('d_sae')} vs "
                            f"{sb[site].get('d_sae')} features): compare graphs built with the same SAEs")
        fa, fb = sa[site].get("fingerprint"), sb[site].get("fingerprint")
        if fa and fb and fa != fb:
            notes.append(f"the SAEs at {site} have different weights (fingerprints {fa} and {fb}): the same "
                         f"feature id may not be the same feature")
    nodes_a, nodes_b = set(a.nodes["site"].to_pylist()), set(b.nodes["site"].to_pylist())
    for name, only in (("A", nodes_a - nodes_b), ("B", nodes_b - nodes_a)):
        if only:
            notes.append(f"sites only in graph {name}: {sorted(only)}; their edges count as "
                         f"{'lost' if name == 'A' else 'gained'}")
    return notes


def edge_frame(graph) -> tuple[dict[tuple, int], list[str]]:
    """{key: row} of a graph's edges (the strongest row where a key repeats) and notes on repeats."""
    cols = {c: graph.edges[c].to_pylist() for c in KEY_COLUMNS}
    weight = np.abs(graph.edges["weight"].to_numpy(zero_copy_only=False))
    rows: dict[tuple, int] = {}
    repeats = 0
    for r in range(graph.n_edges):
        key = tuple(cols[c][r] for c in KEY_COLUMNS)
        if key in rows:
            repeats += 1
            if weight[r] <= weight[rows[key]]:
                continue
        rows[key] = r
    notes = [f"{repeats} edge rows repeat a (source, target, modulator, positions) key; the strongest is compared"] \
        if repeats else []
    return rows, notes


def diff_graphs(a, b) -> GraphDiff:
    """Compare graph ``a`` with graph ``b`` (InteractionGraphs of the same SAEs): every edge of either,
    labelled 'same' (in both, same kind), 'flipped' (in both, excitatory in one and inhibitory in the
    other), 'lost' (in a only) or 'gained' (in b only)."""
    notes = sae_notes(a, b)
    rows_a, na = edge_frame(a)
    rows_b, nb = edge_frame(b)
    notes += [f"graph A: {n}" for n in na] + [f"graph B: {n}" for n in nb]
    keys = list(rows_a) + [k for k in rows_b if k not in rows_a]
    kind_a, kind_b = a.edges["kind"].to_pylist(), b.edges["kind"].to_pylist()
    w_a, w_b = a.edges["weight"].to_pylist(), b.edges["weight"].to_pylist()
    p_a, p_b = a.edges["p_value"].to_pylist(), b.edges["p_value"].to_pylist()
    out = {c: [k[i] for k in keys] for i, c in enumerate(KEY_COLUMNS)}
    pick = lambda values, rows: [values[rows[k]] if k in rows else None for k in keys]  # noqa: E731
    out.update(kind_a=pick(kind_a, rows_a), kind_b=pick(kind_b, rows_b), weight_a=pick(w_a, rows_a),
               weight_b=pick(w_b, rows_b), p_value_a=pick(p_a, rows_a), p_value_b=pick(p_b, rows_b))
    status = []
    for ka, kb in zip(out["kind_a"], out["kind_b"]):
        status.append("gained" if ka is None else "lost" if kb is None else "same" if ka == kb else "flipped")
    out["status"] = status
    schema = pa.schema([("source_site", pa.string()), ("source", pa.int64()), ("target_site", pa.string()),
                        ("target", pa.int64()), ("modulator_site", pa.string()), ("modulator", pa.int64()),
                        ("positions", pa.string()), ("status", pa.string()), ("kind_a", pa.string()),
                        ("kind_b", pa.string()), ("weight_a", pa.float64()), ("weight_b", pa.float64()),
                        ("p_value_a", pa.float64()), ("p_value_b", pa.float64())])
    table = pa.table({f.name: pa.array(out[f.name], f.type) for f in schema}, schema=schema)
    counts = {s: status.count(s) for s in STATUSES}
    return GraphDiff(table, counts, notes)
