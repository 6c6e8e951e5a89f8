"""Integer ids for a graph's nodes: (site, feature) pairs numbered 0..N-1 in forward order of sites,
then feature id (a pure function of the node table)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import JfigError, SiteError
from ..sites import sort_sites

Key = tuple[str, int]


@dataclass(frozen=True, eq=False)
class NodeIndex:
    """The N nodes of a graph in forward order: sites (distinct, forward order by `sort_sites`),
    node_site [N] (index into sites) and node_feature [N] int64, sorted by (site, feature)."""

    sites: tuple[str, ...]
    node_site: np.ndarray
    node_feature: np.ndarray

    @classmethod
    def from_graph(cls, graph) -> "NodeIndex":
        names = np.asarray(graph.nodes["site"].to_numpy(), object)
        features = np.asarray(graph.nodes["feature"].to_numpy(), np.int64)
        sites = sort_sites(names.tolist())
        rank = site_ranks(names, sites)
        order = np.lexsort((features, rank))
        return cls(sites, rank[order], features[order])

    def __len__(self) -> int:
        return len(self.node_site)

    @property
    def keys(self) -> list[Key]:
        """The N node keys (site, feature) in index order."""
        names = np.asarray(self.sites, object)[self.node_site]
        return list(zip(names.tolist(), self.node_feature.tolist()))

    def lookup(self, sites, features) -> np.ndarray:
        """Node indices [k] of k (site, feature) pairs given as arrays, -1 where a pair is not a node."""
        names = np.asarray(sites, object)
        rank = np.full(len(names), -1, np.int64)
        if len(names):
            known = {s: r for r, s in enumerate(self.sites)}
            unique, inverse = np.unique(names.astype(str), return_inverse=True)
            rank = np.array([known.get(u, -1) for u in unique.tolist()], np.int64)[inverse.ravel()]
        features = np.asarray(features).astype(np.int64)
        stride = int(self.node_feature.max(initial=0)) + 1
        codes = self.node_site * stride + self.node_feature            # increasing: sorted by (site, feature)
        inside = (features >= 0) & (features < stride)
        want = rank * stride + np.where(inside, features, 0)
        at = np.minimum(np.searchsorted(codes, want), max(len(codes) - 1, 0))
        return np.where(inside & (rank >= 0) & (codes[at] == want), at, -1)

    def index_of(self, sites, features) -> np.ndarray:
        """Node indices [k] of k (site, feature) pairs given as arrays; every pair must be a node."""
        rank = site_ranks(np.asarray(sites, object), self.sites)          # SiteError for a site with no nodes
        at = self.lookup(sites, features)
        found = at >= 0
        if not found.all():
            features = np.asarray(features).astype(np.int64)
            bad = int(np.flatnonzero(~found)[0])
            site, feature = self.sites[rank[bad]], int(features[bad])
            have = self.node_feature[self.node_site == rank[bad]]
            raise JfigError(f"({site!r}, {feature}) is not a node of the graph: its nodes at {site} are "
                            f"{len(have)} features with ids from {have.min()} to {have.max()}")
        return at

    def locate(self, keys) -> np.ndarray:
        """Node indices [k] of k (site, feature) keys."""
        keys = list(keys)
        return self.index_of([k[0] for k in keys], [k[1] for k in keys]) if keys else np.zeros(0, np.int64)


def site_ranks(names: np.ndarray, sites: tuple[str, ...]) -> np.ndarray:
    """Index into `sites` of each name in `names` (object array [k]); SiteError for a site not there."""
    if not len(names):
        return np.zeros(0, np.int64)
    unique, inverse = np.unique(names.astype(str), return_inverse=True)
    rank = {s: r for r, s in enumerate(sites)}
    missing = [s for s in unique.tolist() if s not in rank]
    if missing:
        raise SiteError(f"site {missing[0]!r} has no nodes in the graph; its sites are {list(sites)}")
    return np.array([rank[s] for s in unique.tolist()], np.int64)[inverse.ravel()]
