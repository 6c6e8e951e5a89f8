"""Integration neurons: MLP hidden units best explained by products of SAE features.

For each neuron m (its activation, blocks.{L}.mlp.hook_post, or its pre-activation) and each candidate
pair (i, j) of features of an SAE whose site that MLP reads, two least-squares fits over the tokens:

    linear:  y_m ≈ c + Σ_k β_k f_k                      (every feature of `linear_features`)
    product: y_m ≈ c + Σ_k β_k f_k + w_ijm · f_i f_j

The product fit never needs a second pass: by Frisch–Waugh–Lovell its weight is
w = pᵀ M y / pᵀ M p with p = f_i f_j and M the projection off the linear design, and every term is a
running sum over tokens (XᵀX, Xᵀy, yᵀy, pᵀy, pᵀX, pᵀp), accumulated on device for all pairs and
neurons at once (no loop over pairs) and in float64 on the host between batches. Three criteria,
as the source document's three ways of picking an integration unit (maximum weight, maximum
difference, maximum variance):

- ``weight`` [P, F]: w_ijm, the product's coefficient (per unit of f_i·f_j);
- ``difference`` [P, F]: |w|·sqrt(pᵀMp / n_ij), the root mean square, over the n_ij tokens where
  both features fire, of the change the product term makes to the fitted activation (ŷ_product −
  ŷ_linear = w·Mp), in the neuron's units;
- ``variance`` [P, F]: (pᵀMy)² / (pᵀMp · SS_tot), the fraction of the neuron's variance the
  product adds to the linear fit (ΔR²), with an F test of that one added term (``p_value``).

`gating_enrichment` asks whether the graph's gating hyperedges at the SAE's site (the unordered pairs
(source, modulator)) are integration pairs more often than the other candidates: a hypergeometric
test of the overlap with the top fraction by a criterion, and a rank permutation test.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import f as f_dist
from scipy.stats import hypergeom

from ..atlas import token_batches
from ..errors import JfigError
from ..interactions.neurons import MLP_WEIGHTS
from ..interactions.pairs import check_pairs
from ..interactions.readin import check_finite, check_model_sae, layer_params, mm, reading_layer
from ..models.layers import norm
from ..sites import block_site, site_key

CRITERIA = ("weight", "difference", "variance")
READS = ("post", "pre")
SUM_KEYS = ("xx", "xy", "yy", "py", "px", "pp", "both", "n")


@dataclass(frozen=True)
class IntegrationNeurons:
    """Integration scores of P candidate pairs at F neurons (criteria in the module docstring).

    pairs [P, 2] feature ids; weight, difference, variance, p_value [P, F] (NaN where the pair never
    fires together or its product is a linear function of the features); r2_linear [F] the linear
    fit's R²; cooccurrence [P] tokens where both fire; n_tokens; site / layer / read say what was fitted
    (site "" and layer -1 for activations given directly)."""

    pairs: np.ndarray
    weight: np.ndarray
    difference: np.ndarray
    variance: np.ndarray
    p_value: np.ndarray
    r2_linear: np.ndarray
    cooccurrence: np.ndarray
    n_tokens: int
    site: str = ""
    layer: int = -1
    read: str = "post"

    def score(self, criterion: str) -> np.ndarray:
        """[P, F] the criterion's score: |weight|, difference or variance (NaN as -inf)."""
        if criterion not in CRITERIA:
            raise JfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        v = np.abs(self.weight) if criterion == "weight" else getattr(self, criterion)
        return np.where(np.isfinite(v), v, -np.inf)

    def ranked(self, criterion: str = "variance", k: int = 10) -> list[tuple[int, int, int, float]]:
        """The k strongest (feature i, feature j, neuron, score) entries by `criterion`, strongest first."""
        s = self.score(criterion)
        flat = s.reshape(-1)
        top = np.argsort(-flat, kind="stable")[:k]
        F = s.shape[1]
        return [(int(self.pairs[t // F, 0]), int(self.pairs[t // F, 1]), int(t % F), float(flat[t])) for t in top
                if np.isfinite(flat[t])]

    def pair_scores(self, criterion: str = "variance") -> np.ndarray:
        """[P] each pair's best score over neurons (-inf for a pair with none)."""
        return self.score(criterion).max(1)


# ------------------------------------------------------------------------------------------ sums

@jax.jit
def batch_sums(f, y, w, pi, pj):
    """Sums over one batch's tokens. f [T, K] linear features, y [T, F] neuron values, w [T] token
    weights (0 or 1), pi / pj [P] columns of f whose product is each candidate term."""
    hp = jax.lax.Precision.HIGHEST
    x = jnp.concatenate([jnp.ones((f.shape[0], 1), f.dtype), f], axis=1) * w[:, None]      # [T, K+1]
    y = y * w[:, None]
    p = f[:, pi] * f[:, pj] * w[:, None]                                                  # [T, P]
    return dict(xx=jnp.matmul(x.T, x, precision=hp), xy=jnp.matmul(x.T, y, precision=hp), yy=(y * y).sum(0),
                py=jnp.matmul(p.T, y, precision=hp), px=jnp.matmul(p.T, x, precision=hp), pp=(p * p).sum(0),
                both=(p != 0).sum(0, dtype=jnp.int32), n=w.sum())


def fold(sums: dict | None, batch: dict) -> dict:
    """Add one batch's sums (device float32) into the running host float64 sums."""
    batch = {k: np.asarray(v, np.float64) for k, v in jax.device_get(batch).items()}
    return batch if sums is None else {k: sums[k] + batch[k] for k in SUM_KEYS}


def finish(sums: dict, pairs: np.ndarray, *, ridge: float = 1e-6, site: str = "", layer: int = -1,
           read: str = "post") -> IntegrationNeurons:
    """The criteria from the running sums (module docstring). `ridge` (relative to the mean diagonal)
    keeps XᵀX invertible when a feature never fires."""
    xx, xy, yy, n = sums["xx"], sums["xy"], sums["yy"], float(sums["n"])
    K1 = xx.shape[0]
    lam = ridge * max(float(np.trace(xx)) / K1, 1e-12)
    G = xx + lam * np.diag(np.r_[0.0, np.ones(K1 - 1)])
    chol = np.linalg.cholesky(G)

    def solve(b):
        return np.linalg.solve(chol.T, np.linalg.solve(chol, b))

    beta = solve(xy)                                                                        # [K1, F]
    ss_tot = yy - xy[0] ** 2 / max(n, 1.0)
    rss_lin = yy - (beta * xy).sum(0)
    gamma = solve(sums["px"].T)                                                             # [K1, P]
    pmp = sums["pp"] - (sums["px"] * gamma.T).sum(1)                                        # [P]
    pmy = sums["py"] - sums["px"] @ beta                                                    # [P, F]
    ok = (pmp > 1e-9 * np.maximum(sums["pp"], 1e-30))[:, None] & (sums["both"] > 0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(ok, pmy / pmp[:, None], np.nan)
        dss = np.where(ok, pmy ** 2 / pmp[:, None], np.nan)
        variance = np.where(ss_tot > 0, dss / ss_tot, np.nan)
        difference = np.abs(w) * np.sqrt(pmp / np.maximum(sums["both"], 1))[:, None]
        dof = n - K1 - 1
        rss_full = np.maximum(rss_lin[None] - dss, 0.0)
        F_stat = dss / (rss_full / max(dof, 1.0))
        p = np.where(np.isfinite(F_stat), f_dist.sf(F_stat, 1, max(dof, 1.0)), np.nan)
        r2 = np.where(ss_tot > 0, 1.0 - rss_lin / ss_tot, np.nan)
    return IntegrationNeurons(pairs=np.asarray(pairs), weight=w, difference=difference, variance=variance, p_value=p,
                              r2_linear=r2, cooccurrence=sums["both"].astype(np.int64), n_tokens=int(n), site=site,
                              layer=layer, read=read)


def integration_from_activations(batches, pairs, *, ridge: float = 1e-6) -> IntegrationNeurons:
    """Integration scores from activations given directly: `batches` yields (features [T, K],
    neurons [T, F]) or (features, neurons, weight [T]); pairs [P, 2] are columns of features."""
    sums = None
    pairs = np.asarray(pairs)
    for batch in batches:
        f, y, *w = batch
        f, y = np.asarray(f, np.float32), np.asarray(y, np.float32)
        if f.ndim != 2 or y.ndim != 2 or f.shape[0] != y.shape[0]:
            raise JfigError(f"a batch must be features [T, K] and neurons [T, F] with the same T, got {f.shape} and "
                            f"{y.shape}")
        if sums is None:
            pairs = check_pairs(pairs, f.shape[1], "the given features")
        check_finite("a batch of features", f)
        check_finite("a batch of neuron values", y)
        w = np.ones(f.shape[0], np.float32) if not w else np.asarray(w[0], np.float32)
        sums = fold(sums, batch_sums(jnp.asarray(f), jnp.asarray(y), jnp.asarray(w), jnp.asarray(pairs[:, 0]),
                                     jnp.asarray(pairs[:, 1])))
    if sums is None:
        raise JfigError("no batches given; expected (features [T, K], neurons [T, F]) batches")
    return finish(sums, pairs, ridge=ridge)


@partial(jax.jit, static_argnames=("site", "mid", "post", "read"))
def _model_batch(model, sae, w, cols, tokens, valid, pi, pj, *, site, mid, post, read):
    """The sums of one token batch [b, s] of a built-in model (valid [b, s] bool)."""
    capture = tuple(dict.fromkeys((site, mid if read == "pre" else post)))
    out = model.run(tokens, capture=capture, stop_at=max(capture, key=site_key), logits=False)
    f = jnp.take(sae.encode(out.cache[site]), cols, axis=-1)
    if read == "pre":
        h = norm(model.config, out.cache[mid], w["ln2_w"], w.get("ln2_b"))
        y = mm(h, w["W_gate"]) if "W_gate" in w else mm(h, w["W_up"]) + w.get("b_up", 0.0)
    else:
        y = out.cache[post]
    T = tokens.shape[0] * tokens.shape[1]
    return batch_sums(f.reshape(T, -1), y.reshape(T, -1), valid.reshape(T).astype(jnp.float32), pi, pj)


def integration_neurons(model, sae, tokens, pairs, *, layer: int | None = None, read: str = "post",
                        linear_features=None, batch_size: int = 16, skip_positions: int = 1, ridge: float = 1e-6,
                        progress: bool = False) -> IntegrationNeurons:
    """Integration scores of candidate `pairs` ([P, 2] feature ids of `sae`) at every neuron of the MLP that
    reads `sae.site` (the first one, or `layer`), streamed over `tokens` [n_seq, seq].

    read: "post" (the MLP's hidden activation, blocks.{L}.mlp.hook_post) or "pre" (the pre-activation
    that goes through the nonlinearity: the gate for gated MLPs, W_up for plain ones). linear_features:
    the features of the linear terms (default every feature of the SAE); the pairs' features must be
    among them. Positions before `skip_positions` (the sequence-start token) are left out.
    """
    if read not in READS:
        raise JfigError(f"read must be one of {READS}, got {read!r}")
    cfg = check_model_sae(model, sae, "integration_neurons")
    layer = reading_layer(sae.site, cfg.n_layers, "mlp", layer)
    pairs = check_pairs(pairs, sae.d_sae, sae.site)
    lin = np.arange(sae.d_sae) if linear_features is None else np.unique(np.asarray(linear_features, np.int64))
    missing = np.setdiff1d(np.unique(pairs), lin)
    if missing.size:
        raise JfigError(f"pair features {missing[:5].tolist()} are not among the linear features; the product fit "
                        f"adds f_i·f_j to a fit that already has f_i and f_j")
    pi, pj = np.searchsorted(lin, pairs[:, 0]), np.searchsorted(lin, pairs[:, 1])
    w = layer_params(model, layer, MLP_WEIGHTS)
    mid, post = block_site(layer, "hook_resid_mid"), block_site(layer, "mlp.hook_post")
    tokens = np.asarray(model.check_tokens(tokens))
    sums = None
    batches = list(token_batches(tokens, batch_size, model.vocab_size))
    for k, (toks, rows) in enumerate(batches):
        valid = np.zeros(toks.shape, bool)
        valid[:rows, skip_positions:] = True
        sums = fold(sums, _model_batch(model, sae, w, jnp.asarray(lin, jnp.int32), jnp.asarray(toks),
                                       jnp.asarray(valid), jnp.asarray(pi, jnp.int32), jnp.asarray(pj, jnp.int32),
                                       site=sae.site, mid=mid, post=post, read=read))
        if progress:
            print(f"integration neurons: batch {k + 1}/{len(batches)}", flush=True)
    return finish(sums, pairs, ridge=ridge, site=sae.site, layer=layer, read=read)


# ------------------------------------------------------------------------------------------ gating

def gating_pairs(graph, site: str) -> np.ndarray:
    """[G, 2] the distinct unordered (source, modulator) pairs of the graph's gating hyperedges whose
    source and modulator both sit at `site` (smaller id first)."""
    cols = graph.edges.select(["kind", "source_site", "source", "modulator_site", "modulator"]).to_pydict()
    out = {tuple(sorted((int(s), int(m)))) for kind, ss, s, ms, m in zip(*cols.values())
           if kind == "gating" and ss == site and ms == site and s != m}
    return np.asarray(sorted(out), np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class GatingEnrichment:
    """Are gating pairs integration pairs more often than other candidates?

    n_pairs candidates, n_gating of them gating pairs, n_integration in the top `top` fraction by
    `criterion` (best neuron per pair), overlap of the two, expected = n_gating·n_integration/n_pairs,
    p_hypergeom = P(overlap ≥ observed); mean_rank_gating / mean_rank_other (rank 1 = strongest) and
    p_permutation = P(mean rank of a random set of n_gating candidates ≤ the gating pairs')."""

    criterion: str
    top: float
    n_pairs: int
    n_gating: int
    n_integration: int
    overlap: int
    expected: float
    p_hypergeom: float
    mean_rank_gating: float
    mean_rank_other: float
    p_permutation: float


def gating_enrichment(result: IntegrationNeurons, gating, *, criterion: str = "variance", top: float = 0.1,
                      n_perm: int = 10000, seed: int = 0) -> GatingEnrichment:
    """The enrichment of gating pairs (`gating`: [G, 2] ids, e.g. `gating_pairs(graph, site)`) among the
    integration pairs of `result` (whose candidates must include them to count)."""
    if not 0.0 < top < 1.0:
        raise JfigError(f"top must be a fraction in (0, 1), got {top}")
    score = result.pair_scores(criterion)
    P = len(score)
    key = {tuple(sorted(map(int, p))): r for r, p in enumerate(result.pairs)}
    gating = np.asarray(gating, np.int64).reshape(-1, 2)
    rows = np.asarray(sorted({key[t] for t in (tuple(sorted(map(int, g))) for g in gating) if t in key}), np.int64)
    if rows.size == 0:
        raise JfigError(f"none of the {len(gating)} gating pairs is among the {P} candidate pairs; add them to the "
                        f"candidates")
    is_g = np.zeros(P, bool)
    is_g[rows] = True
    rank = np.empty(P)
    rank[np.argsort(-score, kind="stable")] = np.arange(1, P + 1)
    n_int = max(1, int(round(top * P)))
    integ = rank <= n_int
    overlap = int((integ & is_g).sum())
    rng = np.random.default_rng(seed)
    null = np.concatenate([np.take(rank, np.argsort(rng.random((min(1000, n_perm - b), P)), axis=1)[:, :rows.size])
                           .mean(1) for b in range(0, n_perm, 1000)])                 # random sets, 1,000 at a time
    obs = rank[is_g].mean()
    return GatingEnrichment(criterion=criterion, top=top, n_pairs=P, n_gating=int(rows.size), n_integration=n_int,
                            overlap=overlap, expected=rows.size * n_int / P,
                            p_hypergeom=float(hypergeom.sf(overlap - 1, P, n_int, rows.size)),
                            mean_rank_gating=float(obs), mean_rank_other=float(rank[~is_g].mean()) if (~is_g).any()
                            else float("nan"), p_permutation=float((1 + (null <= obs).sum()) / (1 + n_perm)))
