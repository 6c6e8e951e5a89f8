"""The co-activation atlas (seed 000 §6.1): firing statistics, activation quantiles, top contexts and
pairwise co-activation (counts, P(j|i), conditional means, PMI, low co-activation tests) of SAE
features across sites, streamed over a corpus in bounded memory.

    atlas = build_atlas(model, saes, tokens, window=5, position_window=0)
    atlas.firing_rate(site)                 # [d_sae]
    atlas.alpha_levels(site)                # [d_sae, 3]: 10th/50th/90th percentiles of non-zero activations
    atlas.pmi(source_site, target_site)     # [n_source, n_target] over the tracked features
    atlas.save(dir); Atlas.load(dir); Atlas.merge(a, b)

Formulas and conventions: docs/atlas.md. The device-side accumulator is `jfig.atlas_stats`.
"""
from __future__ import annotations

import itertools
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from scipy import stats as sps

from .atlas_stats import AtlasAccumulator
from .errors import JfigError, ShapeError, SiteError
from .sites import sort_sites

MAX_TRACKED = 4096


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
                    seed: int = 0, min_size: int = 2) -> list[set[tuple[str, int]]]:
        """Louvain communities (networkx, seeded) of the positive-PMI graph: nodes (site, feature),
        an undirected edge for each tracked pair with C >= min_count and PMI > min_pmi, weight PMI.
        Largest first; communities smaller than `min_size` are dropped."""
        import networkx as nx

        g = nx.Graph()
        for src, tgt in self.pairs:
            co, pmi = self.coactivation(src, tgt), self.pmi(src, tgt)
            keep = (co >= min_count) & (pmi > min_pmi)
            if src == tgt:
                keep = np.triu(keep, 1)
            for i, j in zip(*np.nonzero(keep)):
                g.add_edge((src, int(self.features[src][i])), (tgt, int(self.features[tgt][j])),
                           weight=float(pmi[i, j]))
        if g.number_of_edges() == 0:
            return []
        comms = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
        return sorted((set(c) for c in comms if len(c) >= min_size), key=lambda c: (-len(c), sorted(c)))

    def save(self, path) -> None:
        """Write to directory `path` (JSON manifest + .npz files, pair matrices sparse); written to a
        temporary directory first and renamed, so `path` is never half-written."""
        from .atlas_io import save_atlas
        save_atlas(self, path)

    @classmethod
    def load(cls, path) -> "Atlas":
        from .atlas_io import load_atlas
        return load_atlas(path)

    @staticmethod
    def merge(a: "Atlas", b: "Atlas") -> "Atlas":
        """Statistics of corpus a followed by corpus b: counts add exactly, sums add, top contexts
        are re-ranked (b's sequence indices shifted by a.n_sequences)."""
        from .atlas_io import merge_atlases
        return merge_atlases(a, b)

    def extend(self, model, saes, tokens_or_batches, *, batch_size: int = 8, progress: bool = False,
               corpus_hash: str | None = None) -> "Atlas":
        """This atlas merged with one built on more tokens (same sites, features and settings)."""
        s = self.settings
        more = build_atlas(model, saes, tokens_or_batches, window=s["window"], position_window=s["position_window"],
                           features=self.features, top_contexts=s["top_contexts"], batch_size=batch_size,
                           progress=progress, corpus_hash=corpus_hash, max_active=s["max_active"],
                           context=tuple(s["context"]), skip_positions=s["skip_positions"], method=s["method"],
                           hist_bins=s["hist_bins"], hist_range=tuple(s["hist_range"]), exact_values=s["exact_values"])
        return Atlas.merge(self, more)


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


# ---------------------------------------------------------------------------------- building

def _sae_list(model, saes) -> list:
    saes = list(saes.values()) if isinstance(saes, dict) else list(saes)
    if not saes:
        raise JfigError("build_atlas needs at least one SAE")
    by_site = {}
    for sae in saes:
        if sae.site in by_site:
            raise JfigError(f"two SAEs are at site {sae.site}; the atlas takes one SAE per site")
        model.check_site(sae.site)
        if sae.site.endswith("hook_pattern"):
            raise SiteError(f"SAEs cannot read {sae.site}: attention patterns are not a token-aligned vector")
        width = model.site_width(sae.site)
        if width is not None and sae.d_in != width:
            raise ShapeError(f"SAE d_in {sae.d_in} does not match site {sae.site} width {width}")
        by_site[sae.site] = sae
    return [by_site[s] for s in sort_sites(by_site)]


def _check_tokens(arr, vocab) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ShapeError(f"token batches must be integer arrays [n_seq, seq], got {arr.dtype} {arr.shape}")
    if arr.size and vocab is not None and (arr.min() < 0 or arr.max() >= vocab):
        bad = arr.max() if arr.max() >= vocab else arr.min()
        raise ShapeError(f"token id {bad} is outside the vocabulary [0, {vocab})")
    return arr.astype(np.int32)


def token_batches(tokens_or_batches, batch_size: int, vocab: int | None = None):
    """Yield (tokens [batch_size, seq] int32, n_valid_rows): rows regrouped into fixed-size batches
    (the last padded with zero rows) so every step has one shape. Accepts [n_seq, seq] or an
    iterable of such arrays."""
    src = [tokens_or_batches] if getattr(tokens_or_batches, "ndim", None) == 2 else tokens_or_batches
    buf = np.zeros((0, 0), np.int32)
    for arr in src:
        arr = _check_tokens(arr, vocab)
        if len(buf) and arr.shape[1] != buf.shape[1]:
            yield _pad(buf, batch_size)
            buf = buf[:0]
        buf = arr if not len(buf) else np.concatenate([buf, arr])
        while len(buf) >= batch_size:
            yield buf[:batch_size], batch_size
            buf = buf[batch_size:]
    if len(buf):
        yield _pad(buf, batch_size)


def _pad(rows, batch_size):
    return np.concatenate([rows, np.zeros((batch_size - len(rows), rows.shape[1]), np.int32)]), len(rows)


@partial(jax.jit, static_argnames=("sites",))
def _firing_counts(model, saes, tokens, valid, *, sites):
    out = model.run(tokens, capture=sites, stop_at=sites[-1], logits=False)
    return [((sae.encode(out.cache[s]) > 0) & valid[..., None]).sum((0, 1)) for sae, s in zip(saes, sites)]


def build_atlas(model, saes, tokens_or_batches, *, window: int = 5, position_window: int = 0, features=None,
                top_contexts: int = 8, batch_size: int = 8, progress: bool = True, corpus_hash: str | None = None,
                max_tracked: int = MAX_TRACKED, selection_batches: int = 16, max_active=None,
                context: tuple[int, int] = (12, 4), skip_positions: int = 0, method: str = "auto",
                hist_bins: int = 256, hist_range: tuple[float, float] = (1e-4, 1e4), exact_values: int = 64) -> Atlas:
    """Stream `tokens_or_batches` ([n_seq, seq] ints, or an iterable of such batches) through `model`
    and `saes` (one SAE per site) and return the :class:`Atlas`.

    window: site pairs whose layers differ by at most this (same-site pairs included).
    position_window: count j at positions p..p+w after i at p (0: same token).
    features: site -> feature ids whose pairs are counted; default all when d_sae <= max_tracked,
      else the max_tracked most frequent in the first `selection_batches` batches.
    max_active: active features kept per token (default the SAE's k for topk, else 128).
    skip_positions: positions < this are not counted (e.g. 1 to skip BOS).
    method: "sparse" (scatter; CPU), "dense" (one-hot matmuls; accelerators) or "auto".
    """
    saes = _sae_list(model, saes)
    sites = tuple(s.site for s in saes)
    batches = token_batches(tokens_or_batches, batch_size, model.vocab_size)
    features = dict(features or {})
    if any(s.d_sae > max_tracked and s.site not in features for s in saes):
        head = list(itertools.islice(batches, selection_batches))
        counts = [np.zeros(s.d_sae, np.int64) for s in saes]
        for toks, rows in head:
            valid = np.zeros(toks.shape, bool)
            valid[:rows, skip_positions:] = True
            fired = _firing_counts(model, tuple(saes), jnp.asarray(toks), jnp.asarray(valid), sites=sites)
            for c, x in zip(counts, fired):
                c += np.asarray(x)
        for s, c in zip(saes, counts):
            if s.d_sae > max_tracked and s.site not in features:
                features[s.site] = np.sort(np.argsort(-c, kind="stable")[:max_tracked])
        batches = itertools.chain(head, batches)
    if max_active is None:
        max_active = {s.site: s.k for s in saes if s.architecture == "topk"}
    acc = AtlasAccumulator({s.site: s.d_sae for s in saes}, features=features, window=window,
                           position_window=position_window, top_contexts=top_contexts, context=context,
                           max_active=max_active, hist_bins=hist_bins, hist_range=hist_range,
                           exact_values=exact_values, skip_positions=skip_positions, method=method)
    total = None
    if getattr(tokens_or_batches, "ndim", None) == 2:
        total = -(-len(tokens_or_batches) // batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=total, desc="atlas", unit="batch")
    for toks, rows in batches:
        acc.update_from_model(model, saes, toks, rows)
    atlas = Atlas.from_accumulator(acc, corpus_hash)
    dropped = {s: int(atlas.stats(s)["dropped"]) for s in sites}
    if any(dropped.values()):
        warnings.warn(f"some tokens had more active features than max_active ({acc.settings()['max_active']}); "
                      f"entries left out of histograms/contexts (and sparse pair counts): {dropped}", stacklevel=2)
    return atlas
