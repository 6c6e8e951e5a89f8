"""Network statistics of an interaction graph, each compared with the rewiring null.

    stats = structure(edges)                          # one graph (or one rewired copy): a dict of numbers
    table = against_null(edges, copies)               # value, null mean, null sd, z for every statistic

Statistics (first-order edges, gating hyperedges left out):

- clustering: the average local clustering coefficient and the transitivity of the undirected
  simple graph behind the edges (a triangle is three features linked in any direction);
- path length: the mean shortest undirected hop count between nodes of the largest connected
  component, from `path_sources` sampled start nodes (breadth-first search, scipy.sparse.csgraph),
  and the largest component's share of the nodes;
- small world: sigma = (C / C_null) / (L / L_null), C the average clustering and L the mean path
  length, the null means taken over the rewired copies (sigma > 1: more clustered than the null
  at a comparable path length);
- assortativity: Pearson's r over edges between the source's and the target's degree, for the
  four (source out/in, target out/in) combinations (Newman's directed assortativity; networkx's
  degree_assortativity_coefficient gives the same numbers). The degrees are kept by the rewiring,
  so the null shows what the degrees alone imply;
- reciprocity: the share of edges whose reverse edge is also present. jfig measures a pair only
  from an earlier site to a later one, so a reverse pair is never tested and reciprocity is zero
  by construction; it is then reported with `structural` set instead of a number.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from .rewire import SignedEdges

PATH_SOURCES = 64
ASSORTATIVITY = (("out", "in"), ("in", "in"), ("out", "out"), ("in", "out"))


def undirected(n: int, source: np.ndarray, target: np.ndarray) -> sparse.csr_matrix:
    """[n, n] symmetric 0/1 adjacency of the simple undirected graph behind the edges."""
    a = sparse.csr_matrix((np.ones(len(source)), (source, target)), shape=(n, n))
    a = ((a + a.T) > 0).astype(np.float64)
    a.setdiag(0)
    a.eliminate_zeros()
    return a.tocsr()


def clustering(a: sparse.csr_matrix) -> tuple[float, float, np.ndarray]:
    """(average local clustering over all nodes, transitivity, local clustering [n]) of a symmetric
    0/1 adjacency (networkx's average_clustering and transitivity)."""
    deg = np.asarray(a.sum(1)).ravel()
    tri = np.asarray((a @ a).multiply(a).sum(1)).ravel() / 2          # triangles through each node
    pairs = deg * (deg - 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        local = np.where(pairs > 0, tri / pairs, 0.0)
    total_pairs = pairs.sum()
    return float(local.mean()) if len(local) else 0.0, float(tri.sum() / total_pairs) if total_pairs else 0.0, local


def path_length(a: sparse.csr_matrix, starts: np.ndarray) -> float:
    """Mean finite shortest-path hop count from `starts` to the other nodes they reach."""
    if len(starts) == 0:
        return float("nan")
    d = csgraph.shortest_path(a, method="D", unweighted=True, directed=False, indices=starts)
    ok = np.isfinite(d) & (d > 0)
    return float(d[ok].mean()) if ok.any() else float("nan")


def largest_component(a: sparse.csr_matrix) -> np.ndarray:
    """Node ids of the largest connected component (nodes with an edge only)."""
    _, labels = csgraph.connected_components(a, directed=False)
    counts = np.bincount(labels)
    return np.flatnonzero(labels == counts.argmax())


def assortativity(edges: SignedEdges, target: np.ndarray, x: str, y: str) -> float:
    """Pearson r over edges of the source's `x` degree and the target's `y` degree ("out" or "in")."""
    n = len(edges.layer)
    deg = {"out": np.bincount(edges.source, minlength=n), "in": np.bincount(target, minlength=n)}
    a, b = deg[x][edges.source].astype(np.float64), deg[y][target].astype(np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def structure(edges: SignedEdges, target: np.ndarray | None = None, starts: np.ndarray | None = None) -> dict:
    """Every statistic of one graph (target: a rewired copy's targets); path lengths from `starts`."""
    tgt = edges.target if target is None else target
    a = undirected(len(edges.layer), edges.source, tgt)
    avg, trans, _ = clustering(a)
    if starts is None:
        starts = path_starts(edges)
    out = {"average_clustering": avg, "transitivity": trans, "mean_path_length": path_length(a, starts),
           "largest_component_share": len(largest_component(a)) / max(1, int((np.asarray(a.sum(1)).ravel() > 0).sum()))}
    for x, y in ASSORTATIVITY:
        out[f"assortativity_{x}_{y}"] = assortativity(edges, tgt, x, y)
    return out


def path_starts(edges: SignedEdges, k: int = PATH_SOURCES, seed: int = 0) -> np.ndarray:
    """k start nodes drawn (seeded) from the largest component of the graph's own edges."""
    comp = largest_component(undirected(len(edges.layer), edges.source, edges.target))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(comp, size=min(k, len(comp)), replace=False)) if len(edges) else np.zeros(0, np.int64)


def reciprocity(edges: SignedEdges) -> dict:
    """Share of edges whose reverse is an edge too; `structural` says whether a reverse pair can be an
    edge at all (no edge goes backward or stays at one depth: every tested pair ran forward)."""
    forward = bool((edges.layer[edges.source] < edges.layer[edges.target]).all())
    if forward:
        return {"value": None, "structural": True,
                "note": "every pair is measured from an earlier site to a later one, so no reverse pair is "
                        "tested: reciprocity is zero by construction, not a finding"}
    n = len(edges.layer)
    keys = set((edges.source * n + edges.target).tolist())
    back = np.asarray([int(t) * n + int(s) in keys for s, t in zip(edges.source, edges.target)])
    return {"value": float(back.mean()) if len(back) else None, "structural": False, "note": ""}


def against_null(edges: SignedEdges, copies: list[np.ndarray], seed: int = 0) -> list[dict]:
    """A row per statistic: value, null_mean, null_sd, z over the rewired copies (targets), and the
    small-world sigma built from the average clustering and the mean path length."""
    starts = path_starts(edges, seed=seed)
    real = structure(edges, starts=starts)
    null = [structure(edges, t, starts) for t in copies]
    rows = []
    for k, v in real.items():
        vals = np.asarray([c[k] for c in null], np.float64)
        rows.append(summarise(k, v, vals))
    c0 = np.nanmean([c["average_clustering"] for c in null]) if null else np.nan
    l0 = np.nanmean([c["mean_path_length"] for c in null]) if null else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = (real["average_clustering"] / c0) / (real["mean_path_length"] / l0)
    rows.append({"statistic": "small_world_sigma", "value": float(sigma) if np.isfinite(sigma) else None,
                 "null_mean": 1.0, "null_sd": None, "z": None})
    return rows


def summarise(name: str, value: float, null: np.ndarray) -> dict:
    """One statistic against its null sample: mean, sd and z (None where undefined)."""
    null = null[np.isfinite(null)]
    mean = float(null.mean()) if len(null) else None
    sd = float(null.std(ddof=1)) if len(null) > 1 else None
    z = (value - mean) / sd if sd and np.isfinite(value) else None
    return {"statistic": name, "value": float(value) if np.isfinite(value) else None, "null_mean": mean,
            "null_sd": sd, "z": z}
