"""Feature manifolds: groups of SAE features that vary along a low-dimensional curve or sheet (days of
the week, months, numbers, positions), found among clusters of features.

    groups = feature_manifolds(saes, atlas=atlas, graph=graph, labels=top_token_labels(atlas, tok))
    manifold_table(groups)                       # one row per group
    plot_manifolds([g for g in groups if g.is_manifold], "manifolds.png")

Two clusterings propose groups:

- ``decoder``: average-linkage agglomerative clustering of the decoder rows under cosine distance
  (scipy.cluster.hierarchy), the dendrogram cut at ``1 - min_cosine``, so a group's members are on
  average at least that similar to each other. A manifold's points share a direction (what makes
  them "a day") and differ along a few others (which day); average linkage keeps a ring whose
  opposite points are far apart in one group as long as the ring as a whole is tight, where single
  linkage would chain unrelated features and complete linkage would cut the ring. scipy's
  implementation is deterministic, exact and needs no graph threshold. The default cut, 0.4, keeps
  a ring of shared part a and circular part b whole while its halves' mean cosine a^2 - (4 / pi^2) b^2
  stays above it (0.49 for a = 0.8, b = 0.6; at 0.5 such a ring falls into two arcs), and is ten
  standard deviations of the cosine of two random directions in a 576-wide residual stream.
- ``coactivation``: the atlas's communities of its positive-PMI co-activation graph (Leiden, through
  leidenalg, as ``Atlas.communities``): features that fire together in context.

Each group is described by its decoder rows (unit norm, [n, d_in]): the participation ratio of
their centred covariance and the TWO-NN intrinsic dimension, the explained variance of its
principal axes, a 2-D embedding (the first two principal coordinates: classical MDS of the
Euclidean distances) and, with a graph, the edges among its members against random groups of the
same size and site composition. A group is a manifold when it has at least ``min_size`` members and
a participation ratio of at most ``max_dimension``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist, squareform

from ..errors import JfigError, OptionError, ShapeError
from ..sites import sort_sites
from .rewire import signed_edges

CLUSTERINGS = ("decoder", "coactivation")
DPI = 120
MAX_LABELS = 40          # points labelled in a plot (the rest drawn unlabelled)


@dataclass(frozen=True, eq=False)
class FeatureManifold:
    """One group of features and its geometry.

    members: [(site, feature)] (n of them); source: "decoder" or "coactivation"; labels [n]: each
    member's label (its top token), "" when unknown; mean_cosine: mean pairwise cosine of the decoder
    rows; participation_ratio: (sum λ)^2 / sum λ^2 over the eigenvalues λ of the rows' centred
    covariance (1 for points on a line, 2 for a circle, about n - 1 for points in general position);
    two_nn: TWO-NN intrinsic dimension (nan for fewer than 3 distinct points); explained [min(n, d)]:
    the principal axes' fractions of variance; embedding [n, 2]: the first two principal coordinates;
    dimension_null: mean participation ratio of random groups of the same size and sites; is_manifold.
    Graph (NaN / -1 when no graph was given): edges (first-order edges among members), excitatory,
    inhibitory, density (edges / (n (n - 1))), null_density (mean over random groups), null_p (share of
    random groups with at least as many edges, plus one, over samples plus one)."""

    members: list
    source: str
    labels: list
    mean_cosine: float
    participation_ratio: float
    two_nn: float
    explained: np.ndarray
    embedding: np.ndarray
    dimension_null: float
    is_manifold: bool
    edges: int = -1
    excitatory: int = -1
    inhibitory: int = -1
    density: float = float("nan")
    null_density: float = float("nan")
    null_p: float = float("nan")
    sites: tuple = field(default=())

    @property
    def size(self) -> int:
        return len(self.members)


# ------------------------------------------------------------------------------ estimators

def participation_ratio(x) -> float:
    """(sum λ)^2 / sum λ^2 of the eigenvalues of the centred covariance of the rows of x [n, d]: the
    number of dimensions the rows spread over (PCA participation ratio; nan for fewer than 2 rows or no
    spread)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        return float("nan")
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2      # eigenvalues (times n)
    total = s.sum()
    return float(total ** 2 / (s ** 2).sum()) if total > 0 else float("nan")


def explained_variance(x) -> np.ndarray:
    """[min(n, d)] the fraction of the centred rows' variance along each principal axis, largest first."""
    x = np.asarray(x, np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return s / s.sum() if s.sum() > 0 else s


def two_nn_dimension(x) -> float:
    """Intrinsic dimension of the rows of x [n, d] by TWO-NN (Facco, d'Errico, Rodriguez and Laio, 2017,
    "Estimating the intrinsic dimension of datasets by a minimal neighborhood information", Sci. Rep.
    7:12140), in its maximum-likelihood form: with mu_i = r2_i / r1_i the ratio of each point's second
    to first nearest-neighbour distance, mu follows a Pareto law of index d, so d = n / sum log mu_i.
    Points with a duplicate (r1 = 0) are left out; nan when fewer than 3 remain. The estimator assumes
    locally uniform (Poisson) sampling: evenly spaced points (a regular ring of 7 days) have r1 = r2
    and read as very high-dimensional, so the participation ratio decides what is a manifold."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 3:
        return float("nan")
    dist = squareform(pdist(x))                                     # [n, n], O(n^2) memory, not O(n^2 d)
    np.fill_diagonal(dist, np.inf)
    r = np.sort(dist, axis=1)[:, :2]
    ok = r[:, 0] > 0
    if ok.sum() < 3:
        return float("nan")
    log_mu = np.log(r[ok, 1] / r[ok, 0])
    return float(ok.sum() / log_mu.sum()) if log_mu.sum() > 0 else float("inf")


def principal_coordinates(x, k: int = 2) -> np.ndarray:
    """[n, k] coordinates of the rows of x [n, d] on their first k principal axes (classical MDS of
    their Euclidean distances); zero columns past the rank."""
    x = np.asarray(x, np.float64)
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    out = np.zeros((len(x), k))
    m = min(k, len(s))
    out[:, :m] = u[:, :m] * s[:m]
    return out


# ------------------------------------------------------------------------------ clustering

def _by_site(saes) -> dict:
    saes = [saes] if hasattr(saes, "W_dec") else list(saes)
    if not saes:
        raise OptionError("no SAEs given: pass one SAE or a list of SAEs whose features are clustered")
    by_site = {s.site: s for s in saes}
    if len(by_site) != len(saes):
        raise OptionError(f"two SAEs read one site ({[s.site for s in saes]}); give one SAE per site")
    widths = {s.site: s.d_in for s in saes}
    if len(set(widths.values())) > 1:
        raise ShapeError(f"decoder rows of different widths cannot be compared: d_in by site {widths}")
    return {s: by_site[s] for s in sort_sites(list(by_site))}


def _pool(by_site: dict, features) -> list:
    """[(site, feature)] the clustering considers: `features` ({site: ids}) or every feature."""
    if features is None:
        return [(s, f) for s, sae in by_site.items() for f in range(sae.d_sae)]
    unknown = sorted(set(features) - set(by_site))
    if unknown:
        raise OptionError(f"features= names sites {unknown} that have no SAE here; the SAEs read {list(by_site)}")
    out = []
    for s in by_site:
        ids = np.unique(np.asarray(list(features.get(s, ())), np.int64))
        if len(ids) and (ids.min() < 0 or ids.max() >= by_site[s].d_sae):
            raise OptionError(f"features at {s} must be in 0..{by_site[s].d_sae - 1}, got {ids.min()}..{ids.max()}")
        out += [(s, int(f)) for f in ids]
    if not out:
        raise OptionError("features= selects no feature to cluster")
    return out


def _rows(by_site: dict, members) -> np.ndarray:
    """Unit decoder rows [n, d_in] of (site, feature) members."""
    w = {s: np.asarray(sae.W_dec, np.float64).reshape(sae.d_sae, -1) for s, sae in by_site.items()}
    x = np.stack([w[s][f] for s, f in members]) if members else np.zeros((0, 1))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def decoder_clusters(saes, *, features=None, min_cosine: float = 0.4, min_size: int = 2) -> list[list]:
    """Groups [(site, feature)] of features whose decoder rows are similar: average-linkage clustering
    under cosine distance (scipy), cut at 1 - min_cosine; largest first, groups below min_size dropped.
    saes: one SAE or several of one width (rows of different sites are clustered together);
    features: {site: ids} to cluster (default: every feature). Memory: n (n - 1) / 2 distances."""
    if not -1.0 < float(min_cosine) <= 1.0:
        raise OptionError(f"min_cosine must be in (-1, 1], got {min_cosine}")
    by_site = _by_site(saes)
    pool = _pool(by_site, features)
    if len(pool) < 2:
        return []
    x = _rows(by_site, pool)
    dist = np.clip(pdist(x, "cosine"), 0.0, 2.0)
    labels = hierarchy.fcluster(hierarchy.linkage(dist, method="average"), t=1.0 - float(min_cosine),
                                criterion="distance")
    groups = [[pool[i] for i in np.flatnonzero(labels == c)] for c in np.unique(labels)]
    return sorted((g for g in groups if len(g) >= min_size), key=lambda g: (-len(g), g))


def coactivation_clusters(atlas, *, features=None, min_count: int = 10, min_pmi: float = 0.0,
                          min_size: int = 2, seed: int = 0, method: str = "leiden") -> list[list]:
    """Groups [(site, feature)] of features that fire together: the atlas's communities of its
    positive-PMI graph (``Atlas.communities``; Leiden by default), restricted to ``features``."""
    comms = atlas.communities(min_count=min_count, min_pmi=min_pmi, seed=seed, min_size=min_size, features=features,
                              method=method)
    return [sorted(c, key=lambda m: (sort_sites(atlas.sites).index(m[0]), m[1])) for c in comms]


# ------------------------------------------------------------------------------ labels

def top_token_labels(atlas, tokenizer, members) -> dict:
    """{(site, feature): the token at which the feature's strongest atlas context fires} ("" when the
    feature never fired in the atlas)."""
    at = int(atlas.settings["context"][0])
    out = {}
    for site, f in members:
        ctx = atlas.contexts(site, int(f)) if site in atlas.sites else []
        tok = ctx[0]["tokens"][at] if ctx else -1
        out[(site, int(f))] = tokenizer.decode([int(tok)]) if tok >= 0 else ""
    return out


# ------------------------------------------------------------------------------ groups

def _graph_arrays(graph, pool):
    """(source, target, sign) of the graph's first-order edges as positions in `pool` (-1: not in it)."""
    e = signed_edges(graph)
    where = {m: i for i, m in enumerate(pool)}
    to_pool = np.asarray([where.get((s, int(f)), -1) for s, f in e.names], np.int64)
    return to_pool[e.source], to_pool[e.target], e.sign


def _random_groups(pool, members, n: int, rng) -> np.ndarray:
    """[n, len(pool)] bool: random groups with the members' count at each site, drawn from the pool."""
    site_of = np.asarray([s for s, _ in pool], object)
    out = np.zeros((n, len(pool)), bool)
    for site in {s for s, _ in members}:
        k = sum(s == site for s, _ in members)
        cand = np.flatnonzero(site_of == site)
        picks = np.argsort(rng.random((n, len(cand))), axis=1)[:, :k]
        out[np.arange(n)[:, None], cand[picks]] = True
    return out


def feature_manifolds(saes, *, atlas=None, graph=None, labels=None, features=None,
                      clusterings=("decoder",), min_cosine: float = 0.4, min_size: int = 6,
                      max_dimension: float = 3.0, min_count: int = 10, null_samples: int = 200,
                      seed: int = 0) -> list[FeatureManifold]:
    """Clusters of features with their intrinsic dimension, 2-D embedding and interactions (module
    docstring), largest first within each clustering.

    saes: one SAE or several of one width; atlas: needed by the "coactivation" clustering; graph: an
    InteractionGraph whose edges among each group's members are counted against ``null_samples``
    random groups of the same size and sites (drawn from the clustered features); labels: {(site,
    feature): text} (e.g. :func:`top_token_labels`); features: {site: ids} to cluster (default all);
    clusterings: any of "decoder", "coactivation"; groups of at least ``min_size`` members with a
    participation ratio <= ``max_dimension`` are manifolds."""
    clusterings = (clusterings,) if isinstance(clusterings, str) else tuple(clusterings)
    bad = [c for c in clusterings if c not in CLUSTERINGS]
    if bad or not clusterings:
        raise OptionError(f"clusterings must be a non-empty selection of {CLUSTERINGS}, got {clusterings!r}")
    if "coactivation" in clusterings and atlas is None:
        raise OptionError("the 'coactivation' clustering needs atlas=")
    if min_size < 3:
        raise OptionError(f"min_size must be >= 3 (a dimension needs at least 3 points), got {min_size}")
    if not max_dimension > 0 or null_samples < 0:
        raise OptionError(f"max_dimension must be > 0 and null_samples >= 0, got {max_dimension} and {null_samples}")
    by_site = _by_site(saes)
    pool = _pool(by_site, features)
    rng = np.random.default_rng(seed)
    arrays = _graph_arrays(graph, pool) if graph is not None else None
    groups = []
    if "decoder" in clusterings:
        groups += [("decoder", g) for g in decoder_clusters(by_site.values(), features=features, min_cosine=min_cosine,
                                                            min_size=min_size)]
    if "coactivation" in clusterings:
        keep = set(pool)
        feats = {s: [f for t, f in pool if t == s] for s in by_site}
        for g in coactivation_clusters(atlas, features=feats, min_count=min_count, min_size=min_size, seed=seed):
            g = [m for m in g if m in keep]
            if len(g) >= min_size:
                groups.append(("coactivation", g))
    return [_describe(by_site, pool, source, members, labels or {}, arrays, max_dimension, null_samples, rng)
            for source, members in groups]


def group_manifold(saes, members, *, graph=None, labels=None, features=None, max_dimension: float = 3.0,
                   null_samples: int = 200, seed: int = 0, source: str = "given") -> FeatureManifold:
    """The description :func:`feature_manifolds` gives a cluster, for a group chosen by hand (members
    [(site, feature)], e.g. the features of the days of the week). OptionError for an empty group."""
    by_site = _by_site(saes)
    members = [(str(s), int(f)) for s, f in members]
    if len(members) < 2:
        raise OptionError(f"a group needs at least 2 members, got {len(members)}")
    pool = _pool(by_site, features)
    missing = sorted(set(members) - set(pool))
    if missing:
        raise OptionError(f"members {missing[:5]} are not among the features considered (unknown site or id)")
    arrays = _graph_arrays(graph, pool) if graph is not None else None
    return _describe(by_site, pool, source, members, labels or {}, arrays, max_dimension, null_samples,
                     np.random.default_rng(seed))


def _describe(by_site, pool, source, members, labels, arrays, max_dimension, null_samples, rng) -> FeatureManifold:
    x = _rows(by_site, members)
    n = len(members)
    cos = x @ x.T
    pr = participation_ratio(x)
    null = _random_groups(pool, members, max(null_samples, 1), rng)
    pool_x = _rows(by_site, pool)
    null_pr = [participation_ratio(pool_x[row]) for row in null[: min(max(null_samples, 1), 50)]]
    out = dict(members=members, source=source, labels=[labels.get(m, "") for m in members],
               mean_cosine=float((cos.sum() - n) / (n * (n - 1))), participation_ratio=pr, two_nn=two_nn_dimension(x),
               explained=explained_variance(x), embedding=principal_coordinates(x, 2),
               dimension_null=float(np.nanmean(null_pr)), is_manifold=bool(n >= 3 and pr <= max_dimension),
               sites=tuple(sort_sites(list({s for s, _ in members}))))
    if arrays is not None:
        src, tgt, sign = arrays
        where = {m: i for i, m in enumerate(pool)}
        mine = np.zeros(len(pool), bool)
        mine[[where[m] for m in members]] = True
        ok = (src >= 0) & (tgt >= 0)
        inside = np.zeros(len(src), bool)
        inside[ok] = mine[src[ok]] & mine[tgt[ok]]
        possible = n * (n - 1)
        counts = np.zeros(len(null), np.int64)
        if ok.any():
            counts = (null[:, src[ok]] & null[:, tgt[ok]]).sum(1)
        k = int(inside.sum())
        out.update(edges=k, excitatory=int((inside & (sign > 0)).sum()), inhibitory=int((inside & (sign < 0)).sum()),
                   density=k / possible, null_density=float(counts.mean() / possible) if null_samples else float("nan"),
                   null_p=float(((counts >= k).sum() + 1) / (len(counts) + 1)) if null_samples else float("nan"))
    return FeatureManifold(**out)


def manifold_table(manifolds) -> pa.Table:
    """One row per group: source, size, sites, mean_cosine, participation_ratio, dimension_null, two_nn,
    explained_2 (variance on the first two axes), is_manifold, edges, excitatory, inhibitory, density,
    null_density, null_p, members ("site#feature" joined by spaces) and labels (joined by " | ")."""
    ms = list(manifolds)
    col = lambda name: [getattr(m, name) for m in ms]  # noqa: E731
    return pa.table({
        "source": pa.array(col("source"), pa.string()), "size": pa.array([m.size for m in ms], pa.int64()),
        "sites": pa.array([" ".join(m.sites) for m in ms], pa.string()),
        "mean_cosine": pa.array(col("mean_cosine"), pa.float64()),
        "participation_ratio": pa.array(col("participation_ratio"), pa.float64()),
        "dimension_null": pa.array(col("dimension_null"), pa.float64()),
        "two_nn": pa.array(col("two_nn"), pa.float64()),
        "explained_2": pa.array([float(m.explained[:2].sum()) for m in ms], pa.float64()),
        "is_manifold": pa.array(col("is_manifold"), pa.bool_()),
        "edges": pa.array(col("edges"), pa.int64()), "excitatory": pa.array(col("excitatory"), pa.int64()),
        "inhibitory": pa.array(col("inhibitory"), pa.int64()), "density": pa.array(col("density"), pa.float64()),
        "null_density": pa.array(col("null_density"), pa.float64()), "null_p": pa.array(col("null_p"), pa.float64()),
        "members": pa.array([" ".join(f"{s}#{f}" for s, f in m.members) for m in ms], pa.string()),
        "labels": pa.array([" | ".join(m.labels) for m in ms], pa.string())})


# ------------------------------------------------------------------------------ figures

def _draw(ax, m: FeatureManifold) -> None:
    xy = m.embedding
    sites = list(m.sites)
    colour = [sites.index(s) for s, _ in m.members]
    ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="tab10", vmin=0, vmax=9, s=18)
    for (x, y), text in list(zip(xy, m.labels))[:MAX_LABELS]:
        if text:
            ax.annotate(repr(text)[1:-1], (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    var = m.explained[:2].sum()
    ax.set(xlabel="PC 1", ylabel="PC 2", title=f"{m.source}: {m.size} features, PR {m.participation_ratio:.1f}, "
                                                f"TWO-NN {m.two_nn:.1f}\n{var:.0%} of variance on these axes")
    ax.title.set_fontsize(8)


def plot_manifold(manifold: FeatureManifold, path) -> Path:
    """One group's 2-D embedding, each point labelled by its top token; writes a PNG, returns its path."""
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    _draw(fig.subplots(), manifold)
    return _save(fig, path)


def plot_manifolds(manifolds, path, *, columns: int = 3) -> Path:
    """The 2-D embeddings of several groups in a grid (one panel each); JfigError when there are none."""
    ms = list(manifolds)
    if not ms:
        raise JfigError("no groups to plot")
    rows = -(-len(ms) // columns)
    fig = Figure(figsize=(4.5 * min(columns, len(ms)), 4.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, min(columns, len(ms)), squeeze=False)).ravel()
    for ax, m in zip(axes, ms):
        _draw(ax, m)
    for ax in axes[len(ms):]:
        ax.set_visible(False)
    return _save(fig, path)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
