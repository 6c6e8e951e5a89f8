"""Communities of the interaction graph: Louvain and Leiden against the rewiring null, and their
agreement with the co-activation communities of the atlas.

    result = communities(edges, copies, seed=0, atlas_groups=atlas.communities())

The graph is taken undirected with weight |effect| summed over both directions. Louvain is
networkx's `louvain_communities`; Leiden is the `leidenalg` package (on python-igraph), optimising
modularity. Each partition's modularity Q is compared with the Q the same algorithm finds on the
rewired copies (each edge keeps its weight): a real module structure gives Q well above the null's.
Agreement with the atlas is measured on the features both partitions contain, by normalised mutual
information and the adjusted Rand index (python-igraph's compare_communities).
"""
from __future__ import annotations

import igraph as ig
import networkx as nx
import numpy as np
from scipy import sparse

from ..atlas.atlas import leiden_groups
from .network import summarise
from .rewire import SignedEdges

MIN_COMMUNITY = 2


def weighted_graph(edges: SignedEdges, target: np.ndarray) -> nx.Graph:
    """Undirected networkx graph on the nodes with an edge, weight the summed |effect|."""
    n = len(edges.layer)
    w = edges.weight if edges.weight is not None else np.ones(len(edges))
    a = sparse.coo_matrix((w, (edges.source, target)), shape=(n, n)).tocsr()
    a = (a + a.T).tocoo()
    g = nx.Graph()
    keep = a.row < a.col
    g.add_weighted_edges_from(zip(a.row[keep].tolist(), a.col[keep].tolist(), a.data[keep].tolist()))
    return g


def louvain(g: nx.Graph, seed: int) -> tuple[list[set[int]], float]:
    """(communities, modularity) by networkx's Louvain, weight |effect|."""
    if g.number_of_edges() == 0:
        return [], float("nan")
    parts = nx.community.louvain_communities(g, weight="weight", seed=seed)
    return parts, float(nx.community.modularity(g, parts, weight="weight"))


def leiden(g: nx.Graph, seed: int) -> tuple[list[set[int]], float]:
    """(communities, modularity) by leidenalg (modularity quality, `leiden_groups`), weight |effect|."""
    if g.number_of_edges() == 0:
        return [], float("nan")
    nodes = list(g.nodes)
    where = {v: i for i, v in enumerate(nodes)}
    a, b, w = zip(*((where[x], where[y], d["weight"]) for x, y, d in g.edges(data=True)))
    groups = [{nodes[i] for i in members} for members in leiden_groups(len(nodes), a, b, w, seed=seed)]
    return groups, float(nx.community.modularity(g, groups, weight="weight"))


def agreement(groups_a: list[set], groups_b: list[set]) -> dict:
    """NMI and adjusted Rand index of two partitions over the items both contain (None: < 2 shared)."""
    label_a = {x: i for i, c in enumerate(groups_a) for x in c}
    label_b = {x: i for i, c in enumerate(groups_b) for x in c}
    shared = sorted(set(label_a) & set(label_b), key=repr)
    out = {"shared_features": len(shared), "nmi": None, "adjusted_rand": None}
    if len(shared) < 2:
        return out
    a, b = [label_a[x] for x in shared], [label_b[x] for x in shared]
    out["nmi"] = float(ig.compare_communities(a, b, method="nmi"))
    out["adjusted_rand"] = float(ig.compare_communities(a, b, method="adjusted_rand"))
    return out


def communities(edges: SignedEdges, copies: list[np.ndarray], *, seed: int = 0,
                atlas_groups: list[set] | None = None) -> dict:
    """Louvain and Leiden partitions with modularity against the null, community sizes, and (with
    atlas_groups: sets of (site, feature)) agreement with the co-activation communities."""
    g = weighted_graph(edges, edges.target)
    out: dict = {"methods": {}}
    for name, fn in (("louvain", louvain), ("leiden", leiden)):
        parts, q = fn(g, seed)
        null = np.asarray([fn(weighted_graph(edges, t), seed + 1 + k)[1] for k, t in enumerate(copies)], np.float64)
        sizes = sorted((len(c) for c in parts), reverse=True)
        row = {**summarise("modularity", q, null), "n_communities": sum(s >= MIN_COMMUNITY for s in sizes),
               "sizes": sizes, "members": parts}
        if atlas_groups is not None and edges.names is not None:
            named = [{edges.names[i] for i in c} for c in parts if len(c) >= MIN_COMMUNITY]
            row["atlas_agreement"] = agreement(named, [set(c) for c in atlas_groups])
        out["methods"][name] = row
    q = {k: v["members"] for k, v in out["methods"].items()}
    out["louvain_leiden_agreement"] = agreement(q["louvain"], q["leiden"])
    return out
