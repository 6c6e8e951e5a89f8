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
from ..sites import sort_sites


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


class NodeIndex:
    """Integer ids for (site, feature) pairs of a graph: site index * stride + feature."""

    def __init__(self, graph):
        self.sites = sort_sites(set(graph.nodes["site"].to_pylist()))
        self.site_id = {s: i for i, s in enumerate(self.sites)}
        self.stride = int(pc.max(graph.nodes["feature"]).as_py() or 0) + 1
        self.nodes = self.encode(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_numpy())

    def encode(self, sites, features) -> np.ndarray:
        ids = np.asarray([self.site_id.get(s, -1) for s in sites], np.int64)
        return np.where(ids < 0, -1, ids * self.stride + np.asarray(features, np.int64))

    def decode(self, ids) -> list:
        return [(self.sites[int(i) // self.stride], int(i) % self.stride) for i in ids]


def edge_arrays(graph, index: NodeIndex, min_weight: float = 0.0):
    """(source, target, modulator, keep, |weight|) arrays over the edge rows; modulator -1 on first-order
    rows, keep = a gating row or |weight| >= min_weight."""
    e = graph.edges
    src = index.encode(e["source_site"].to_pylist(), e["source"].to_numpy())
    tgt = index.encode(e["target_site"].to_pylist(), e["target"].to_numpy())
    gating = np.asarray(pc.equal(e["kind"], "gating").to_numpy(zero_copy_only=False), bool)
    msite = e["modulator_site"].to_pylist()
    mod = np.where(gating, index.encode([m or "" for m in msite], e["modulator"].fill_null(0).to_numpy()), -1)
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
    index = NodeIndex(graph)
    seed_ids = index.encode([s for s, _ in seeds], [f for _, f in seeds])
    missing = [seeds[i] for i in np.flatnonzero(~np.isin(seed_ids, index.nodes))]
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
    order = np.argsort(ids, kind="stable")
    nodes = tuple(index.decode(ids[order]))
    return Subgraph(nodes, {n: hop[int(i)] for n, i in zip(nodes, ids[order])},
                    graph.edges.filter(pa.array(inside)))


def internal_fraction(graph, nodes, index: NodeIndex | None = None, arrays=None) -> float:
    """Share of the first-order edges touching `nodes` that lie inside them: internal / (internal +
    boundary). 1 = a subgraph with no edges to the rest of the graph."""
    index = index or NodeIndex(graph)
    src, tgt, mod = (arrays if arrays is not None else edge_arrays(graph, index))[:3]
    ids = index.encode([s for s, _ in nodes], [f for _, f in nodes])
    first = mod < 0
    a, b = np.isin(src[first], ids), np.isin(tgt[first], ids)
    touching = int((a | b).sum())
    return float((a & b).sum() / touching) if touching else float("nan")
