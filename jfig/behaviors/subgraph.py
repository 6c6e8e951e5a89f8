"""k-hop behaviour subgraphs of an interaction graph (a pure function of the graph's tables).

From seed features, walk *upstream* (to the sources and modulators of edges into the frontier) and
*downstream* (to the targets of edges out of the frontier) separately, k hops each, following
first-order edges with |weight| >= min_weight and gating hyperedges (a hyperedge links its source
and its modulator to its target). With `per_node`, each frontier feature follows only its
`per_node` strongest edges (by |weight|) in the walk's direction: interaction graphs have hubs
with thousands of edges, and two unrestricted hops from any seed reach a large part of the graph.
The subgraph is the seeds, what the two walks reach, and every edge of the graph (gating rows
included) whose features all lie in that set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import JfigError
from ..graph import NodeIndex


@dataclass(frozen=True)
class Subgraph:
    """Nodes [(site, feature)] in forward order with their `hop` (0 for seeds, + upstream hops as
    negative numbers, downstream as positive) and `edges`, the graph's rows among them."""

    nodes: tuple
    hop: dict
    edges: pa.Table

    def __len__(self) -> int:
        return len(self.nodes)

    def by_site(self) -> dict:
        """{site: sorted feature ids}."""
        out: dict = {}
        for s, f in self.nodes:
            out.setdefault(s, []).append(f)
        return {s: sorted(v) for s, v in out.items()}


def edge_arrays(graph, index: NodeIndex, min_weight: float = 0.0):
    """(source, target, modulator, keep, |weight|) node-index arrays over the edge rows; modulator -1 on
    first-order rows, keep = a gating row or |weight| >= min_weight."""
    e = graph.edges
    src = index.index_of(e["source_site"].to_numpy(), e["source"].to_numpy())
    tgt = index.index_of(e["target_site"].to_numpy(), e["target"].to_numpy())
    gating = np.asarray(pc.equal(e["kind"], "gating").to_numpy(zero_copy_only=False), bool)
    mod = np.full(len(src), -1, np.int64)
    mod[gating] = index.index_of(np.asarray(e["modulator_site"].to_numpy(), object)[gating],
                                 np.asarray(e["modulator"].to_numpy())[gating])
    strength = np.abs(e["weight"].to_numpy())
    keep = gating | (strength >= min_weight)
    return src, tgt, mod, keep, strength


def strongest_per_node(node: np.ndarray, strength: np.ndarray, per_node: int | None) -> np.ndarray:
    """bool mask over rows: each row among the `per_node` strongest rows of its `node` (all if None)."""
    if per_node is None:
        return np.ones(len(node), bool)
    order = np.lexsort((-strength, node))
    sorted_node = node[order]
    first = np.searchsorted(sorted_node, sorted_node, side="left")
    keep = np.zeros(len(node), bool)
    keep[order] = (np.arange(len(node)) - first) < per_node
    return keep


def khop_subgraph(graph, seeds, k: int = 2, *, min_weight: float = 0.0, per_node: int | None = 10) -> Subgraph:
    """The k-hop subgraph around `seeds` [(site, feature)] (module docstring)."""
    if k < 0:
        raise JfigError(f"k must be >= 0 hops, got {k}")
    if per_node is not None and per_node < 1:
        raise JfigError(f"per_node must be >= 1 edges (or None for all), got {per_node}")
    if not seeds:
        raise JfigError("a behaviour subgraph needs at least one seed feature")
    index = NodeIndex.from_graph(graph)
    seed_ids = index.lookup([s for s, _ in seeds], [f for _, f in seeds])
    missing = [seeds[i] for i in np.flatnonzero(seed_ids < 0)]
    if missing:
        raise JfigError(f"seed feature(s) {missing[:5]} are not nodes of the graph (sites {index.sites})")
    src, tgt, mod, keep, strength = edge_arrays(graph, index, min_weight)
    src, tgt, mod, strength = src[keep], tgt[keep], mod[keep], strength[keep]
    hop = {int(i): 0 for i in seed_ids}
    for direction in (-1, 1):
        frontier = np.unique(seed_ids)
        for h in range(1, k + 1):
            if direction < 0:
                into = np.isin(tgt, frontier)
                into[into] = strongest_per_node(tgt[into], strength[into], per_node)
                reached = np.concatenate([src[into], mod[into & (mod >= 0)]])
            else:
                by_src = np.isin(src, frontier)
                by_src[by_src] = strongest_per_node(src[by_src], strength[by_src], per_node)
                by_mod = np.isin(mod, frontier)
                by_mod[by_mod] = strongest_per_node(mod[by_mod], strength[by_mod], per_node)
                reached = tgt[by_src | by_mod]
            frontier = np.setdiff1d(np.unique(reached), np.fromiter(hop, np.int64, len(hop)))
            hop.update({int(i): direction * h for i in frontier})
            if not frontier.size:
                break
    ids = np.fromiter(hop, np.int64, len(hop))
    e_src, e_tgt, e_mod, _, _ = edge_arrays(graph, index)
    inside = np.isin(e_src, ids) & np.isin(e_tgt, ids) & ((e_mod < 0) | np.isin(e_mod, ids))
    ids = np.sort(ids)                                              # node indices run in forward order
    keys = index.keys
    nodes = tuple(keys[i] for i in ids)
    return Subgraph(nodes, {n: hop[int(i)] for n, i in zip(nodes, ids)}, graph.edges.filter(pa.array(inside)))


def internal_fraction(graph, nodes, index: NodeIndex | None = None, arrays=None) -> float:
    """Share of the first-order edges touching `nodes` that lie inside them: internal / (internal +
    boundary). 1 = a subgraph with no edges to the rest of the graph."""
    index = index or NodeIndex.from_graph(graph)
    src, tgt, mod = (arrays if arrays is not None else edge_arrays(graph, index))[:3]
    ids = index.locate(nodes)
    first = mod < 0
    a, b = np.isin(src[first], ids), np.isin(tgt[first], ids)
    touching = int((a | b).sum())
    return float((a & b).sum() / touching) if touching else float("nan")
