"""The null model for statistics of a graph: rewiring that keeps every node's degrees, every edge's
sign and the layer order.

    edges = signed_edges(graph)                      # first-order edges as integer arrays
    src, tgt = rewire(edges, seed=0)                 # one rewired copy: same degrees, signs, layer order

A double-edge swap takes two edges of the same sign, a -> b and c -> d, and makes them a -> d and
c -> b. Every node keeps its out-degree and in-degree of each sign. A swap is refused when it would
create a self-loop, an edge that already exists (either sign), or an edge against the layer order
(target before source; same-layer edges are allowed only if the graph has some). With
preserve="layer_pairs" only edges between the same pair of layers are swapped, which also keeps the
number of edges per (source layer, target layer, sign). Statistics of the graph are then compared
with their distribution over rewired copies (z-scores).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import JfigError, ShapeError
from ..sites import sort_sites

PRESERVE = ("layer_order", "layer_pairs")


@dataclass(frozen=True)
class SignedEdges:
    """A signed directed graph on integer nodes. source, target, sign: [n_edges] (sign +1 or -1);
    layer: [n_nodes], each node's depth (the rank of its site in forward order, or its layer);
    names: [n_nodes] (site, feature) of each node, or None; weight: [n_edges] |effect| or None."""

    source: np.ndarray
    target: np.ndarray
    sign: np.ndarray
    layer: np.ndarray
    names: list | None = None
    weight: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.layer)
        for k in ("source", "target", "sign"):
            if np.shape(getattr(self, k)) != np.shape(self.source):
                raise ShapeError(f"{k} must have one entry per edge ({len(self.source)}), got {np.shape(getattr(self, k))}")
        if len(self.source) and (min(self.source.min(), self.target.min()) < 0 or
                                 max(self.source.max(), self.target.max()) >= n):
            raise ShapeError(f"edge endpoints must be node ids in [0, {n}), got {self.source.min()}..{self.source.max()}"
                             f" -> {self.target.min()}..{self.target.max()}")
        if self.weight is not None and np.shape(self.weight) != np.shape(self.source):
            raise ShapeError(f"weight must have one entry per edge ({len(self.source)}), got {np.shape(self.weight)}")
        if not np.isin(self.sign, (-1, 1)).all():
            raise JfigError(f"sign must be +1 or -1, got values {np.unique(self.sign).tolist()}")

    def __len__(self) -> int:
        return len(self.source)


def signed_edges(graph) -> SignedEdges:
    """The first-order edges of an InteractionGraph (gating hyperedges left out) on integer nodes (the
    rows of graph.nodes): excitatory +1, inhibitory -1, weight |effect|. A node's depth is the rank of
    its site in forward order, so hook_resid_mid comes before hook_resid_post of the same layer."""
    nodes = graph.nodes.to_pydict()
    index = {(s, int(f)): i for i, (s, f) in enumerate(zip(nodes["site"], nodes["feature"]))}
    e = graph.edges.to_pydict()
    keep = [i for i, k in enumerate(e["kind"]) if k in ("excitatory", "inhibitory")]
    src = np.asarray([index[(e["source_site"][i], int(e["source"][i]))] for i in keep], np.int64)
    tgt = np.asarray([index[(e["target_site"][i], int(e["target"][i]))] for i in keep], np.int64)
    sign = np.asarray([1 if e["kind"][i] == "excitatory" else -1 for i in keep], np.int64)
    weight = np.abs(np.asarray([e["weight"][i] for i in keep], np.float64))
    rank = {s: r for r, s in enumerate(sort_sites(set(nodes["site"])))}
    return SignedEdges(src, tgt, sign, np.asarray([rank[s] for s in nodes["site"]], np.int64),
                       list(zip(nodes["site"], nodes["feature"])), weight)


def rewire(edges: SignedEdges, *, swaps_per_edge: float = 10.0, seed: int = 0,
           preserve: str = "layer_order") -> tuple[np.ndarray, np.ndarray]:
    """One rewired copy: (source, target) [n_edges], edge i keeping its sign. About swaps_per_edge x
    n_edges swaps are attempted (refused ones included), enough to forget the original wiring.

    Swaps are proposed in rounds: each round pairs every edge with a random partner of its class
    (disjoint pairs), checks all proposals at once (arrays, no loop over edges) and applies those
    that are valid and create no edge another proposal of the round also creates."""
    if preserve not in PRESERVE:
        raise JfigError(f"unknown preserve {preserve!r}; expected one of {list(PRESERVE)}")
    if swaps_per_edge < 0:
        raise JfigError(f"swaps_per_edge must be >= 0, got {swaps_per_edge}")
    src, tgt, layer = edges.source.copy(), edges.target.copy(), edges.layer
    n, n_nodes = len(src), len(layer)
    if n < 2:
        return src, tgt
    strict = bool((layer[src] < layer[tgt]).all())
    cls = (edges.sign + 1) // 2
    if preserve == "layer_pairs":
        cls = cls + 2 * (layer[src] * (layer.max() + 1) + layer[tgt])
    rng = np.random.default_rng(seed)
    for _ in range(int(np.ceil(2 * swaps_per_edge))):
        order = np.lexsort((rng.random(n), cls))
        a, b = order[0:n - 1:2], order[1::2]
        same = cls[a] == cls[b]
        a, b = a[same], b[same]
        sa, ta, sb, tb = src[a], tgt[a], src[b], tgt[b]
        ok = (sa != sb) & (ta != tb) & (sa != tb) & (sb != ta)
        ok &= (layer[sa] < layer[tb]) & (layer[sb] < layer[ta]) if strict else \
            (layer[sa] <= layer[tb]) & (layer[sb] <= layer[ta])
        present = np.sort(src * n_nodes + tgt)
        new1, new2 = sa * n_nodes + tb, sb * n_nodes + ta
        ok &= ~_contains(present, new1) & ~_contains(present, new2)
        keys = np.concatenate([new1[ok], new2[ok]])
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        clash = counts[inverse] > 1
        k = int(ok.sum())
        good = np.flatnonzero(ok)[~(clash[:k] | clash[k:])]
        tgt[a[good]], tgt[b[good]] = tb[good], ta[good]
    return src, tgt


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[len(keys)] bool: whether each key is in sorted_keys."""
    at = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[at] == keys
