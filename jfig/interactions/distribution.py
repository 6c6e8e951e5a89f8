"""How far the joint distribution of feature activations is from independence, streamed over data.

Two measures for every pair of tracked features (at one or several sites, read at the same token):

- Gaussian fit: the covariance and correlation of the activations (zeros included); under
  independence each correlation is 0 with standard error 1/sqrt(N). The fitted Gaussian's mutual
  information is −½ log(1 − ρ²).
- Binned: each activation falls in one of B bins (bin 0: inactive, f <= 0; bins 1..B−1 split the
  active values at B−2 edges per feature, e.g. quantiles from the atlas); the KL divergence between
  the pair's joint histogram and the product of its marginals is the binned mutual information
  MI = Σ p_ab log(p_ab / (p_a p_b)). Under independence 2·N·MI follows χ² with (r−1)(c−1) degrees
  of freedom (r, c occupied bins), which gives a p-value (G-test) and the bias (r−1)(c−1)/(2N) that
  `mi_corrected` subtracts (Miller–Madow).

The state is fixed at construction: a running mean and co-moment [n, n] (merged batch by batch,
Chan et al.'s update, so float32 does not cancel) and joint bin counts [n·B, n·B], accumulated as
one-hot matrix products (the atlas's dense method).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sps

from ..atlas import Atlas, token_batches
from ..data.progress import progress_iter
from ..errors import JfigError, ShapeError
from ..models.validation import check_features, check_saes
from ..sites import sort_sites
from .readin import check_finite

MAX_STATE = 8192          # n·B: the joint counts are [n·B, n·B] int32 (256 MiB at this size)


@dataclass(frozen=True)
class FeatureDistribution:
    """Pairwise dependence of n tracked features (``sites`` [n], ``features`` [n]) over ``n_tokens``.

    ``mean`` [n]; ``cov``, ``corr``, ``gaussian_mi`` [n, n]; ``mi``, ``mi_corrected``, ``p_value``,
    ``df`` [n, n] (binned). Diagonals: variance, 1, NaN, entropy H(bin), H − bias, NaN, occupied − 1.
    """

    sites: tuple[str, ...]
    features: np.ndarray
    n_tokens: int
    edges: np.ndarray             # [n, B-2]
    mean: np.ndarray
    cov: np.ndarray
    corr: np.ndarray
    gaussian_mi: np.ndarray
    mi: np.ndarray
    mi_corrected: np.ndarray
    p_value: np.ndarray
    df: np.ndarray

    @property
    def corr_se(self) -> float:
        """Standard error of a correlation between independent features, 1/sqrt(N)."""
        return 1.0 / np.sqrt(max(self.n_tokens, 1))

    def index(self, site: str, feature: int) -> int:
        """Row of (site, feature) in every matrix."""
        hit = [r for r, (s, f) in enumerate(zip(self.sites, self.features)) if s == site and f == feature]
        if not hit:
            raise JfigError(f"feature {feature} at {site} is not tracked")
        return hit[0]

    def strongest(self, metric: str = "mi_corrected", k: int = 10) -> list[tuple[str, int, str, int, float]]:
        """The k pairs (a < b) with the largest |metric|: (site_a, feature_a, site_b, feature_b, value)."""
        if metric not in ("cov", "corr", "gaussian_mi", "mi", "mi_corrected"):
            raise JfigError(f"metric must be cov, corr, gaussian_mi, mi or mi_corrected, got {metric!r}")
        m = getattr(self, metric)
        a, b = np.triu_indices(len(self.features), k=1)
        v = np.nan_to_num(np.abs(m[a, b]), nan=-np.inf)
        top = np.argsort(-v, kind="stable")[:k]
        return [(self.sites[a[t]], int(self.features[a[t]]), self.sites[b[t]], int(self.features[b[t]]),
                 float(m[a[t], b[t]])) for t in top]


def init_state(n: int, bins: int) -> dict:
    return dict(n=jnp.zeros((), jnp.float32), mean=jnp.zeros((n,), jnp.float32), m2=jnp.zeros((n, n), jnp.float32),
                counts=jnp.zeros((n * bins, n * bins), jnp.int32), bad=jnp.zeros((), jnp.int32))


def update_state(state: dict, x, valid, edges, bins: int) -> dict:
    """Fold x [T, n] (valid [T] bool) into the state (pure). edges [n, bins-2]."""
    wt = valid.astype(jnp.float32)[:, None]
    bad = jnp.sum(~jnp.isfinite(x) & (wt > 0), dtype=jnp.int32)
    x = jnp.where(wt > 0, jnp.nan_to_num(x), 0.0)
    nb = wt.sum()
    mb = x.sum(0) / jnp.maximum(nb, 1.0)
    xc = (x - mb) * wt
    m2b = jnp.matmul(xc.T, xc, precision=jax.lax.Precision.HIGHEST)
    n = state["n"] + nb
    delta = mb - state["mean"]
    frac = jnp.where(n > 0, nb / jnp.maximum(n, 1.0), 0.0)
    m2 = state["m2"] + m2b + jnp.outer(delta, delta) * state["n"] * frac
    b = jnp.where(x > 0, 1 + (x[..., None] > edges[None]).sum(-1), 0)                       # [T, n]
    onehot = (jax.nn.one_hot(b, bins, dtype=jnp.float32) * wt[..., None]).reshape(x.shape[0], -1)
    cdt = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16                    # 0/1: exact in bf16
    co = jnp.matmul(onehot.T.astype(cdt), onehot.astype(cdt), preferred_element_type=jnp.float32)
    return dict(n=n, mean=state["mean"] + delta * frac, m2=m2, counts=state["counts"] + co.astype(jnp.int32),
                bad=state["bad"] + bad)


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _update(bins, state, acts, index, valid, edges):
    x = jnp.concatenate([a.reshape(-1, a.shape[-1])[:, ix] for a, ix in zip(acts, index)], axis=1)
    return update_state(state, x, valid.reshape(-1), edges, bins)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _model_step(bins, sites, state, model, saes, index, tokens, valid, edges):
    out = model.run(tokens, capture=sites, stop_at=sites[-1], logits=False)
    acts = [sae.encode(out.cache[s]) for sae, s in zip(saes, sites)]
    x = jnp.concatenate([a.reshape(-1, a.shape[-1])[:, ix] for a, ix in zip(acts, index)], axis=1)
    return update_state(state, x, valid.reshape(-1), edges, bins)


def atlas_edges(atlas: Atlas, features: dict, bins: int) -> dict:
    """{site: [n_site, bins-2]}: per feature, the quantiles k/(bins-1), k = 1..bins-2, of its non-zero
    activations in `atlas`, so the active bins hold about equal shares (+inf for features that never fired)."""
    q = np.arange(1, bins - 1) / (bins - 1)
    out = {}
    for site, feats in features.items():
        e = atlas.quantiles(site, q)[np.asarray(feats, np.int64)] if len(q) else np.zeros((len(feats), 0))
        out[site] = np.where(np.isfinite(e), e, np.inf).reshape(len(feats), len(q))
    return out


def binned_mi(counts: np.ndarray, n: int, bins: int, *, rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(MI [n_f, n_f] in nats, df [n_f, n_f]) from joint counts [n_f·B, n_f·B] over n tokens, `rows`
    features at a time."""
    nf = counts.shape[0] // bins
    mi, df = np.zeros((nf, nf)), np.zeros((nf, nf), np.int64)
    for lo in range(0, nf, rows):
        J = counts[lo * bins:(lo + rows) * bins].reshape(-1, bins, nf, bins).transpose(0, 2, 1, 3).astype(np.float64)
        r, c = J.sum(3), J.sum(2)                                                           # [a, b, B]
        with np.errstate(invalid="ignore", divide="ignore"):
            term = np.where(J > 0, J / n * np.log(J * n / (r[..., :, None] * c[..., None, :])), 0.0)
        mi[lo:lo + rows] = np.maximum(term.sum(axis=(2, 3)), 0.0)
        df[lo:lo + rows] = ((r > 0).sum(-1) - 1) * ((c > 0).sum(-1) - 1)
    return mi, df


class DistributionAccumulator:
    """Streaming pairwise dependence of SAE features. ``features`` maps site -> feature ids (tracked in
    forward order of sites, then id); ``d_sae`` maps site -> the SAE width; ``edges`` maps site ->
    [n_site, bins-2] increasing bin edges of active values (not needed when bins == 2). Fold batches
    in with :meth:`update` or :meth:`update_from_model`; :meth:`result` gives a FeatureDistribution.
    """

    def __init__(self, features: dict, d_sae: dict, *, bins: int = 8, edges: dict | None = None,
                 skip_positions: int = 0):
        if not isinstance(bins, (int, np.integer)) or bins < 2:
            raise JfigError(f"bins must be an int >= 2 (bin 0 is 'inactive'), got {bins!r}")
        if not features:
            raise JfigError("features must map at least one site to feature ids")
        self.site_order = sort_sites(features)
        feats = {}
        for site in self.site_order:
            if site not in d_sae:
                raise JfigError(f"no SAE width for site {site}; sites with SAEs are {sorted(d_sae)}")
            f = np.unique(check_features(np.asarray(features[site]), d_sae[site], site))
            if not f.size:
                raise ShapeError(f"no features given for site {site}")
            feats[site] = f
        self.sites = tuple(s for s in self.site_order for _ in feats[s])
        self.features = np.concatenate([feats[s] for s in self.site_order])
        self.index = tuple(jnp.asarray(feats[s], jnp.int32) for s in self.site_order)
        self.d_sae = {s: int(d_sae[s]) for s in self.site_order}
        self.bins, self.skip_positions = int(bins), int(skip_positions)
        n = len(self.features)
        if n * bins > MAX_STATE:
            raise JfigError(f"{n} features x {bins} bins = {n * bins} exceeds {MAX_STATE}: the joint counts would "
                            f"be [{n * bins}, {n * bins}]; track fewer features or use fewer bins")
        self.edges = self._edges(edges, feats)
        self.state = init_state(n, self.bins)
        self.n_tokens = 0

    def _edges(self, edges, feats) -> np.ndarray:
        if self.bins == 2:
            return np.zeros((len(self.features), 0), np.float32)
        if edges is None:
            raise JfigError(f"bins={self.bins} needs bin edges for active values: pass edges= or build from an "
                            f"atlas (atlas_edges), or use bins=2 (active / inactive)")
        rows = []
        for site in self.site_order:
            e = np.asarray(edges.get(site) if isinstance(edges, dict) else None, np.float64)
            if e.shape != (len(feats[site]), self.bins - 2):
                raise ShapeError(f"edges at {site} must have shape [{len(feats[site])}, {self.bins - 2}], got "
                                 f"{e.shape}")
            if np.isnan(e).any() or (np.diff(e, axis=1) < 0).any():
                raise JfigError(f"edges at {site} must be non-decreasing along each row, without NaN")
            rows.append(e)
        return np.concatenate(rows).astype(np.float32)

    def _valid(self, b: int, s: int, n_valid_rows) -> np.ndarray:
        valid = np.zeros((b, s), bool)
        valid[: b if n_valid_rows is None else int(n_valid_rows), self.skip_positions:] = True
        self.n_tokens += int(valid.sum())
        return valid

    def update(self, acts: dict, n_valid_rows: int | None = None) -> None:
        """Fold in activations: site -> [b, s, d_sae] (rows past ``n_valid_rows`` are padding)."""
        arrs = []
        for site in self.site_order:
            if site not in acts:
                raise ShapeError(f"no activations given for site {site}; expected [batch, seq, {self.d_sae[site]}]")
            a = np.asarray(acts[site], np.float32)
            if a.ndim != 3 or a.shape[-1] != self.d_sae[site]:
                raise ShapeError(f"activations at {site} have shape {a.shape}; expected [batch, seq, "
                                 f"{self.d_sae[site]}]")
            check_finite(f"activations at {site}", a)
            arrs.append(a)
        if any(a.shape[:2] != arrs[0].shape[:2] for a in arrs):
            raise ShapeError(f"activations disagree on [batch, seq]: {[a.shape[:2] for a in arrs]}")
        valid = self._valid(*arrs[0].shape[:2], n_valid_rows)
        self.state = _update(self.bins, self.state, tuple(jnp.asarray(a) for a in arrs), self.index,
                             jnp.asarray(valid), jnp.asarray(self.edges))

    def update_from_model(self, model, saes, tokens, n_valid_rows: int | None = None) -> None:
        """Run `model` on tokens [b, s], encode with `saes` (one per site, in site order), fold in."""
        tokens = np.asarray(tokens, np.int32)
        valid = self._valid(*tokens.shape, n_valid_rows)
        self.state = _model_step(self.bins, self.site_order, self.state, model, tuple(saes), self.index,
                                 jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(self.edges))

    def result(self) -> FeatureDistribution:
        st = {k: np.asarray(v) for k, v in jax.device_get(self.state).items()}
        if st["bad"]:
            raise JfigError(f"{int(st['bad'])} NaN or infinite activation(s) reached the accumulator")
        N = self.n_tokens
        cov = st["m2"].astype(np.float64) / max(N - 1, 1)
        sd = np.sqrt(np.diag(cov))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.where(np.outer(sd, sd) > 0, cov / np.outer(sd, sd), 0.0)
            np.fill_diagonal(corr, np.where(sd > 0, 1.0, np.nan))
            gmi = -0.5 * np.log1p(-np.minimum(corr * corr, 1.0))
        np.fill_diagonal(gmi, np.nan)
        mi, df = binned_mi(st["counts"], max(N, 1), self.bins)
        p = sps.chi2.sf(2.0 * N * mi, np.maximum(df, 1))
        p = np.where(df > 0, p, 1.0)
        np.fill_diagonal(p, np.nan)
        return FeatureDistribution(sites=self.sites, features=self.features, n_tokens=N, edges=self.edges,
                                   mean=st["mean"].astype(np.float64), cov=cov, corr=corr, gaussian_mi=gmi, mi=mi,
                                   mi_corrected=mi - df / (2.0 * max(N, 1)), p_value=p, df=df)


def feature_distribution(model, saes, tokens, features: dict, *, bins: int = 8, edges: dict | None = None,
                         atlas: Atlas | None = None, batch_size: int = 8, skip_positions: int = 0,
                         progress: bool = False) -> FeatureDistribution:
    """Stream `tokens` ([n_seq, seq] ints) through `model` and `saes` and measure the pairwise dependence
    of `features` (site -> ids). Bin edges: `edges`, else the atlas's quantiles (`atlas_edges`); with
    bins=2 none are needed. Cost per batch: a forward pass to the last site plus O(tokens·(n·B)²).

    >>> dist = feature_distribution(model, [sae], tokens, {sae.site: range(16)}, bins=2)
    >>> dist.corr.shape, dist.mi.shape
    ((16, 16), (16, 16))
    """
    by_site = check_saes(model, saes)
    missing = set(features) - set(by_site)
    if missing:
        raise JfigError(f"features given for site(s) {sorted(missing)} that have no SAE; SAEs are at {list(by_site)}")
    if edges is None and atlas is not None and bins > 2:
        edges = atlas_edges(atlas, {s: np.unique(check_features(np.asarray(f), by_site[s].d_sae, s))
                                    for s, f in features.items()}, bins)
    acc = DistributionAccumulator(features, {s: by_site[s].d_sae for s in features}, bins=bins, edges=edges,
                                  skip_positions=skip_positions)
    saes = [by_site[s] for s in acc.site_order]
    for toks, rows in progress_iter(list(token_batches(tokens, batch_size, model.vocab_size)),
                                    desc="feature distribution", unit="batch", enabled=progress):
        acc.update_from_model(model, saes, toks, rows)
    return acc.result()
