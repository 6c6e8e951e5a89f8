"""The co-activation atlas: firing statistics, activation quantiles, top contexts and
pairwise co-activation (counts, P(j|i), conditional means, PMI, low co-activation tests) of SAE
features across sites, streamed over a corpus in bounded memory.

    atlas = build_atlas(model, saes, tokens, window=5, position_window=0)
    atlas.firing_rate(site)                 # [d_sae]
    atlas.alpha_levels(site)                # [d_sae, 3]: 10th/50th/90th percentiles of non-zero activations
    atlas.pmi(source_site, target_site)     # [n_source, n_target] over the tracked features
    atlas.save(dir); Atlas.load(dir); Atlas.merge(a, b)

Formulas and conventions: docs/atlas.md. The device-side accumulator is `jfig.atlas.accumulator`;
building is `jfig.atlas.build`, files are `jfig.atlas.storage`.
"""
from __future__ import annotations

import igraph as ig
import leidenalg
import networkx as nx
import numpy as np
import pyarrow as pa
from scipy import stats as sps
from treescope import repr_lib

from ..errors import JfigError, ShapeError, SiteError
from .accumulator import AtlasAccumulator, finalize_site
from .storage import read_atlas, write_atlas

COMMUNITY_METHODS = ("louvain", "leiden")


def leiden_groups(n_nodes: int, a, b, weight, *, seed: int = 0, resolution: float = 1.0) -> list[list[int]]:
    """Leiden communities (leidenalg, RB-configuration quality; resolution 1 is modularity) of the
    undirected weighted graph on nodes 0..n_nodes-1 with edges a[k] - b[k] of weight[k]."""
    h = ig.Graph(n=int(n_nodes), edges=np.stack([np.asarray(a), np.asarray(b)], 1).tolist())
    h.es["weight"] = np.asarray(weight, np.float64).tolist()
    part = leidenalg.find_partition(h, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                    resolution_parameter=resolution, seed=seed)
    return [list(c) for c in part]

class Atlas:
    """Co-activation statistics over a corpus (host numpy arrays). Build with :func:`build_atlas`.

    Attributes: ``sites`` (forward order), ``d_sae`` (site -> int), ``features`` (site -> tracked
    feature ids, the rows/columns of every pair matrix), ``pairs`` ((source_site, target_site),
    source not after target, layers within ``settings["window"]``), ``n_tokens``, ``n_sequences``,
    ``settings``, ``corpus_hash``.
    """

    def __init__(self, *, sites, d_sae, features, settings, site_stats, pair_stats, n_tokens, n_sequences,
                 corpus_hash=None):
        self.sites = tuple(sites)
        self.d_sae = dict(d_sae)
        self.features = {s: np.asarray(features[s], np.int64) for s in self.sites}
        self.settings = dict(settings)
        self._site = dict(site_stats)
        self._pair = dict(pair_stats)
        self.pairs = tuple(self._pair)
        self.n_tokens, self.n_sequences = int(n_tokens), int(n_sequences)
        self.corpus_hash = corpus_hash

    @classmethod
    def from_accumulator(cls, acc: AtlasAccumulator, corpus_hash: str | None = None) -> "Atlas":
        res = acc.result()
        sites = acc.sites
        return cls(sites=sites, d_sae=dict(zip(sites, acc.spec.d_sae)), features=dict(zip(sites, acc.features)),
                   settings=acc.settings(), site_stats=dict(zip(sites, res["sites"])),
                   pair_stats={(sites[a], sites[b]): p for (a, b), p in zip(acc.spec.pairs, res["pairs"])},
                   n_tokens=acc.n_tokens, n_sequences=acc.n_sequences, corpus_hash=corpus_hash)

    def __repr__(self) -> str:
        return (f"Atlas({len(self.sites)} sites, {len(self.pairs)} site pairs, {self.n_tokens} tokens, "
                f"window={self.settings['window']}, position_window={self.settings['position_window']})")

    def __treescope_repr__(self, path, subtree_renderer):
        """Notebook display (treescope): sites, widths, tracked features, pairs and settings."""
        summary = {"sites": {s: f"d_sae {self.d_sae[s]}, {len(self.features[s])} tracked" for s in self.sites},
                   "pairs": [f"{a} -> {b}" for a, b in self.pairs], "n_tokens": self.n_tokens,
                   "n_sequences": self.n_sequences, "settings": self.settings, "corpus_hash": self.corpus_hash}
        return repr_lib.render_object_constructor(type(self), summary, path=None, subtree_renderer=subtree_renderer)

    # ------------------------------------------------------------------ per feature
    def stats(self, site: str) -> dict:
        if site not in self._site:
            raise SiteError(f"site {site!r} is not in this atlas; it has {list(self.sites)}")
        return self._site[site]

    def firing_count(self, site: str) -> np.ndarray:
        """[d_sae] number of tokens on which each feature is > 0."""
        return self.stats(site)["count"]

    def firing_rate(self, site: str) -> np.ndarray:
        """[d_sae] fraction of (counted) tokens on which each feature is > 0."""
        return self.firing_count(site) / max(self.n_tokens, 1)

    def mean_activation(self, site: str) -> np.ndarray:
        """[d_sae] mean of the non-zero activations (nan for features that never fire)."""
        st = self.stats(site)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(st["count"] > 0, st["sum"] / st["count"], np.nan)

    def quantiles(self, site: str, q=(0.1, 0.5, 0.9)) -> np.ndarray:
        """[d_sae, len(q)] quantiles of the non-zero activations: exact (numpy 'linear') while a
        feature has at most ``exact_values`` recorded activations, else read off its log-spaced
        histogram (geometric interpolation inside a bin, clipped to the observed min/max)."""
        st, q = self.stats(site), np.atleast_1d(np.asarray(q, np.float64))
        out = _hist_quantiles(st["hist"], st["vmin"], st["vmax"], *self.settings["hist_range"], q)
        small = (st["nrec"] > 0) & (st["nrec"] <= self.settings["exact_values"])
        if small.any():
            out[small] = np.nanquantile(st["exact"][small], q, axis=1).T
        return out

    def alpha_levels(self, site: str) -> np.ndarray:
        """[d_sae, 3]: the 10th, 50th and 90th percentiles of non-zero activations (clamp levels)."""
        return self.quantiles(site, (0.1, 0.5, 0.9))

    def contexts(self, site: str, feature: int) -> list[dict]:
        """The strongest activations of `feature`, strongest first: dicts with ``sequence`` (index in
        the corpus), ``position``, ``activation`` and ``tokens`` (the window; -1 past either end)."""
        st = self.stats(site)
        rows = zip(st["ctx_seq"][feature], st["ctx_pos"][feature], st["ctx_val"][feature], st["ctx_tok"][feature])
        return [dict(sequence=int(s), position=int(p), activation=float(v), tokens=t.tolist())
                for s, p, v, t in rows if v > 0]

    def tracked_index(self, site: str, features) -> np.ndarray:
        """Positions of SAE feature ids among the tracked features of `site` (-1 if untracked)."""
        tracked = self.features[site]
        pos = np.searchsorted(tracked, features)
        pos = np.minimum(pos, len(tracked) - 1)
        return np.where(tracked[pos] == np.asarray(features), pos, -1)

    # ------------------------------------------------------------------ per pair (tracked features)
    def pair_stats(self, source_site: str, target_site: str) -> dict:
        """Raw pair statistics: {"co": counts, "fsum": sums of the windowed target activation}."""
        return self._p(source_site, target_site)

    def _p(self, source_site: str, target_site: str) -> dict:
        key = (source_site, target_site)
        if key not in self._pair:
            raise SiteError(f"the atlas has no statistics for {source_site} -> {target_site}; its site pairs "
                            f"(window {self.settings['window']}) are {list(self.pairs)}")
        return self._pair[key]

    def coactivation(self, source_site: str, target_site: str) -> np.ndarray:
        """[n_source, n_target] C[i, j]: tokens p where i fires at p and j fires in p..p+w."""
        return self._p(source_site, target_site)["co"]

    def source_count(self, source_site: str) -> np.ndarray:
        """[n_source] n_i, firing counts of the tracked source features."""
        return self.firing_count(source_site)[self.features[source_site]]

    def target_count(self, target_site: str) -> np.ndarray:
        """[n_target] m_j: tokens p where j fires in p..p+w (= n_j when position_window is 0)."""
        return self.stats(target_site)["wcount"]

    def conditional_probability(self, source_site: str, target_site: str) -> np.ndarray:
        """P(j active | i active) = C[i, j] / n_i (nan where i never fires)."""
        n_i = self.source_count(source_site)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_i > 0, self.coactivation(source_site, target_site) / n_i, np.nan)

    def expected_coactivation(self, source_site: str, target_site: str) -> np.ndarray:
        """n_i m_j / N, the co-activation count expected if i and j were independent."""
        return np.outer(self.source_count(source_site), self.target_count(target_site)) / max(self.n_tokens, 1)

    def pmi(self, source_site: str, target_site: str) -> np.ndarray:
        """log(P(i, j) / (P(i) P(j))) = log(C N / (n_i m_j)); -inf where C = 0, nan where a marginal is 0."""
        co, exp = self.coactivation(source_site, target_site), self.expected_coactivation(source_site, target_site)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(exp > 0, np.log(co / exp), np.nan)

    def conditional_mean(self, source_site: str, target_site: str) -> np.ndarray:
        """E[g_j | f_i > 0] (g_j the windowed target activation); nan where i never fires."""
        n_i = self.source_count(source_site)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_i > 0, self._p(source_site, target_site)["fsum"] / n_i, np.nan)

    def target_mean(self, target_site: str) -> np.ndarray:
        """[n_target] E[g_j] over all counted tokens."""
        return self.stats(target_site)["wsum"] / max(self.n_tokens, 1)

    def low_coactivation_pvalue(self, source_site: str, target_site: str, rows=None, cols=None) -> np.ndarray:
        """One-sided p-value of co-activation this low under independence: hypergeometric
        P(X <= C[i, j]) with X ~ Hypergeom(N, m_j, n_i). `rows`/`cols` select tracked positions."""
        rows = slice(None) if rows is None else np.asarray(rows)
        cols = slice(None) if cols is None else np.asarray(cols)
        co = self.coactivation(source_site, target_site)[rows][:, cols]
        n_i = self.source_count(source_site)[rows][:, None]
        m_j = self.target_count(target_site)[cols][None, :]
        return sps.hypergeom.cdf(co, self.n_tokens, m_j, n_i)

    def pair_table(self, source_site: str, target_site: str, *, min_count: int = 1) -> pa.Table:
        """One row per tracked pair with C >= min_count: source, target (SAE ids), count, p_cond,
        pmi, cond_mean, target_mean, expected, p_low."""
        co = self.coactivation(source_site, target_site)
        i, j = np.nonzero(co >= min_count)
        p_low = self.low_coactivation_pvalue(source_site, target_site)[i, j] if len(i) else np.zeros(0)
        return pa.table(dict(
            source=self.features[source_site][i], target=self.features[target_site][j], count=co[i, j],
            p_cond=self.conditional_probability(source_site, target_site)[i, j],
            pmi=self.pmi(source_site, target_site)[i, j],
            cond_mean=self.conditional_mean(source_site, target_site)[i, j],
            target_mean=self.target_mean(target_site)[j],
            expected=self.expected_coactivation(source_site, target_site)[i, j], p_low=p_low))

    # ------------------------------------------------------------------ modules, persistence, merging
    def communities(self, *, min_count: int = 10, min_pmi: float = 0.0, resolution: float = 1.0,
                    seed: int = 0, min_size: int = 2, features: dict | None = None,
                    method: str = "louvain") -> list[set[tuple[str, int]]]:
        """Communities of the positive-PMI graph: nodes (site, feature), an undirected edge for each
        tracked pair with C >= min_count and PMI > min_pmi, weight PMI. `features` ({site: ids})
        keeps only those features; method "louvain" (networkx, seeded) or "leiden" (leidenalg,
        modularity, seeded; much faster on large graphs). Largest first; communities smaller than
        `min_size` are dropped."""
        if method not in COMMUNITY_METHODS:
            raise JfigError(f"unknown community method {method!r}; expected one of {list(COMMUNITY_METHODS)}")
        keep_ids = None if features is None else {s: np.isin(self.features[s], np.asarray(list(f), np.int64))
                                                  for s, f in features.items() if s in self.features}
        offset = dict(zip(self.sites, np.cumsum([0, *(len(self.features[x]) for x in self.sites)])[:-1].tolist()))
        names = [(x, int(f)) for x in self.sites for f in self.features[x]]   # node id -> (site, feature)
        rows, cols, weights = [], [], []
        for src, tgt in self.pairs:
            if keep_ids is not None and (src not in keep_ids or tgt not in keep_ids):
                continue
            co, pmi = self.coactivation(src, tgt), self.pmi(src, tgt)
            keep = (co >= min_count) & (pmi > min_pmi)
            if keep_ids is not None:
                keep &= keep_ids[src][:, None] & keep_ids[tgt][None, :]
            if src == tgt:
                keep = np.triu(keep, 1)
            i, j = np.nonzero(keep)
            rows.append(i + offset[src])
            cols.append(j + offset[tgt])
            weights.append(pmi[i, j])
        if not rows or not sum(map(len, rows)):
            return []
        a, b, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights).astype(np.float64)
        used, index = np.unique(np.concatenate([a, b]), return_inverse=True)      # nodes with an edge
        a, b = index[: len(a)], index[len(a):]
        if method == "louvain":
            g = nx.Graph()
            g.add_weighted_edges_from(zip(a.tolist(), b.tolist(), w.tolist()))
            comms = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
        else:
            comms = leiden_groups(len(used), a, b, w, seed=seed, resolution=resolution)
        comms = [{names[used[k]] for k in c} for c in comms]
        return sorted((set(c) for c in comms if len(c) >= min_size), key=lambda c: (-len(c), sorted(c)))

    def fields(self) -> dict:
        """The constructor's keyword arguments (what storage writes and reads back)."""
        return dict(sites=self.sites, d_sae=self.d_sae, features=self.features, settings=self.settings,
                    site_stats=self._site, pair_stats=self._pair, n_tokens=self.n_tokens,
                    n_sequences=self.n_sequences, corpus_hash=self.corpus_hash)

    def save(self, path) -> None:
        """Write to directory `path` (JSON manifest with file checksums + .npz files, pair matrices
        sparse); written to a temporary directory first and renamed, so `path` is never half-written."""
        write_atlas(path, **self.fields())

    @classmethod
    def load(cls, path) -> "Atlas":
        """Read an atlas directory; a missing, truncated or altered file raises FormatError naming it."""
        return cls(**read_atlas(path))

    @staticmethod
    def merge(a: "Atlas", b: "Atlas") -> "Atlas":
        """Statistics of corpus a followed by corpus b: counts add exactly, sums add, top contexts
        are re-ranked (b's sequence indices shifted by a.n_sequences)."""
        return merge_atlases(a, b)


def _hist_quantiles(hist, vmin, vmax, lo, hi, q):
    """Quantiles [d, len(q)] from per-feature log-spaced histograms [d, bins + 2] (under/overflow)."""
    d, nb = hist.shape[0], hist.shape[1] - 2
    edges = np.geomspace(lo, hi, nb + 1)
    lower = np.concatenate([[0.0], edges])            # bin k covers [lower[k], upper[k])
    upper = np.concatenate([edges, [np.inf]])
    cum = np.cumsum(hist, axis=1)
    n = cum[:, -1]
    out = np.full((d, len(q)), np.nan)
    live = n > 0
    for c, qq in enumerate(q):
        r = qq * (n[live] - 1) + 0.5                   # rank of the quantile, in count units
        k = np.argmax(cum[live] > r[:, None], axis=1)
        before = np.where(k > 0, np.take_along_axis(cum[live], np.maximum(k - 1, 0)[:, None], 1)[:, 0], 0)
        frac = (r - before) / hist[live, k]
        a = np.clip(lower[k], vmin[live], vmax[live])
        b = np.clip(upper[k], vmin[live], vmax[live])
        out[live, c] = a * (b / a) ** np.clip(frac, 0.0, 1.0)
    return out


def merge_atlases(a: Atlas, b: Atlas) -> Atlas:
    """Statistics of a's corpus followed by b's: counts add exactly, sums add, contexts re-ranked."""
    same = lambda s: {k: v for k, v in s.items() if k != "method"}  # noqa: E731
    if a.sites != b.sites or a.d_sae != b.d_sae or a.pairs != b.pairs:
        raise JfigError(f"cannot merge atlases over different sites/pairs: {a.sites} vs {b.sites}")
    if any(not np.array_equal(a.features[s], b.features[s]) for s in a.sites):
        raise JfigError("cannot merge atlases that track different features; build both with the same features=")
    if same(a.settings) != same(b.settings):
        raise JfigError(f"cannot merge atlases built with different settings: {a.settings} vs {b.settings}")
    n_exact, site_stats = a.settings["exact_values"], {}
    for site in a.sites:
        x, y = a.stats(site), b.stats(site)
        st = {k: x[k] + y[k] for k in ("count", "sum", "hist", "nrec", "dropped", "wcount", "wsum")}
        st["vmin"], st["vmax"] = np.minimum(x["vmin"], y["vmin"]), np.maximum(x["vmax"], y["vmax"])
        st["exact"] = np.sort(np.concatenate([x["exact"], y["exact"]], 1), 1)[:, :n_exact]
        y_seq = np.where(y["ctx_seq"] >= 0, y["ctx_seq"] + a.n_sequences, -1)
        vals = np.concatenate([x["ctx_val"], y["ctx_val"]], 1)
        order = np.argsort(-vals, axis=1, kind="stable")[:, : x["ctx_val"].shape[1]]

        def pick(u, v):
            return np.take_along_axis(np.concatenate([u, v], 1), order if u.ndim == 2 else order[..., None], 1)
        st.update(ctx_val=pick(x["ctx_val"], y["ctx_val"]), ctx_seq=pick(x["ctx_seq"], y_seq),
                  ctx_pos=pick(x["ctx_pos"], y["ctx_pos"]), ctx_tok=pick(x["ctx_tok"], y["ctx_tok"]))
        finalize_site(st, n_exact)
        site_stats[site] = st
    pair_stats = {k: dict(co=a.pair_stats(*k)["co"] + b.pair_stats(*k)["co"], fsum=a.pair_stats(*k)["fsum"] + b.pair_stats(*k)["fsum"])
                  for k in a.pairs}
    corpus_hash = f"{a.corpus_hash}+{b.corpus_hash}" if a.corpus_hash and b.corpus_hash else None
    return Atlas(sites=a.sites, d_sae=a.d_sae, features=a.features, settings=a.settings, site_stats=site_stats,
                 pair_stats=pair_stats, n_tokens=a.n_tokens + b.n_tokens, n_sequences=a.n_sequences + b.n_sequences,
                 corpus_hash=corpus_hash)
