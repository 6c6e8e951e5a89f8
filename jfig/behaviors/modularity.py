"""Are behaviour subgraphs modular? Two statistics against chance, both pure functions of the graph.

- **Self-containment**: the internal fraction of a subgraph's edges (subgraph.internal_fraction)
  against subgraphs grown by the same k-hop rule from random seeds: as many seeds, at the same
  sites, each drawn from the `pool` graph nodes of its site nearest in firing rate.
- **Overlap** between two behaviours' node sets (Jaccard) against random node sets of the same
  sizes per site drawn uniformly from the graph's nodes at those sites.

p-values are one-sided Monte-Carlo, (1 + #null at least as extreme) / (1 + n).
"""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow.compute as pc

from ..graph import NodeIndex
from .subgraph import edge_arrays, internal_fraction, khop_subgraph


def _node_rates(graph) -> dict:
    """{site: (feature ids [m], firing rates [m])} from the node table (missing rates count as 0)."""
    out = {}
    sites = np.asarray(graph.nodes["site"].to_pylist())
    feats = graph.nodes["feature"].to_numpy()
    rate = pc.fill_null(graph.nodes["firing_rate"], 0.0).to_numpy()
    for s in np.unique(sites):
        m = sites == s
        out[str(s)] = (feats[m], rate[m])
    return out


def random_seed_sets(graph, seeds, n: int, *, pool: int = 10, seed: int = 0) -> list:
    """n random seed lists [(site, feature)] matched to `seeds` by site and firing rate."""
    rng = np.random.default_rng(seed)
    rates = _node_rates(graph)
    chosen = set(seeds)
    near = {}
    for s, f in seeds:
        ids, r = rates[s]
        own = r[ids == f][0] if (ids == f).any() else 0.0
        order = np.argsort(np.abs(r - own), kind="stable")
        near[(s, f)] = [int(ids[i]) for i in order if (s, int(ids[i])) not in chosen][:max(pool, 1)]
    return [[(s, int(rng.choice(near[(s, f)]))) for s, f in seeds] for _ in range(n)]


def self_containment(graph, subgraph_nodes, seeds, k: int, *, n_null: int = 50, pool: int = 10, seed: int = 0,
                     min_weight: float = 0.0, per_node: int | None = 10) -> dict:
    """Internal fraction of the subgraph vs k-hop subgraphs from matched random seeds."""
    index = NodeIndex.from_graph(graph)
    arrays = edge_arrays(graph, index)
    observed = internal_fraction(graph, subgraph_nodes, index, arrays)
    null = np.asarray([internal_fraction(graph, khop_subgraph(graph, r, k, min_weight=min_weight, per_node=per_node).nodes, index, arrays)
                       for r in random_seed_sets(graph, seeds, n_null, pool=pool, seed=seed)])
    null = null[np.isfinite(null)]
    return {"internal_fraction": observed, "null_mean": float(null.mean()) if null.size else float("nan"),
            "null_sd": float(null.std(ddof=1)) if null.size > 1 else float("nan"),
            "p": float((1 + np.sum(null >= observed)) / (1 + null.size)) if null.size else float("nan"),
            "n_null": int(null.size)}


def overlap(graph, node_sets: dict, *, n_null: int = 1000, seed: int = 0) -> list[dict]:
    """Pairwise Jaccard overlap of behaviours' node sets {name: [(site, feature)]} vs chance."""
    rng = np.random.default_rng(seed)
    rates = _node_rates(graph)
    out = []
    for a, b in itertools.combinations(sorted(node_sets), 2):
        A, B = set(node_sets[a]), set(node_sets[b])
        observed = len(A & B) / len(A | B) if A | B else 0.0
        null = np.empty(n_null)
        for t in range(n_null):
            ra = {(s, int(f)) for s, c in _site_counts(A).items() for f in rng.choice(rates[s][0], c, replace=False)}
            rb = {(s, int(f)) for s, c in _site_counts(B).items() for f in rng.choice(rates[s][0], c, replace=False)}
            null[t] = len(ra & rb) / len(ra | rb)
        out.append({"a": a, "b": b, "shared": len(A & B), "jaccard": observed, "null_mean": float(null.mean()),
                    "p_more": float((1 + np.sum(null >= observed)) / (1 + n_null)),
                    "p_less": float((1 + np.sum(null <= observed)) / (1 + n_null))})
    return out


def _site_counts(nodes) -> dict:
    counts: dict = {}
    for s, _ in nodes:
        counts[s] = counts.get(s, 0) + 1
    return counts
