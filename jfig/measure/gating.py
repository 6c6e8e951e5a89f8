"""Second-order (gating) measurements: does source i change how source k drives target j?

Three statistics per (i, k) pair and every target j, on inputs where i fires above its median,
with both features edited at i's clamp positions:

- ``mixed``: ∂²f_j/∂α_i∂α_k at the natural operating point, forward-over-forward (jvp of jvp);
- ``factorial``: the 2×2 clamp contrast f(hi,hi) − f(hi,lo) − f(lo,hi) + f(lo,lo) divided by
  (Δα_i·Δα_k) — the interaction term D of a 2×2 factorial design, in the units of the mixed derivative;
- ``conditional``: G_k = |I(i→j | k active) − I(i→j | k inactive)| (docs/concepts.md), from the
  per-input clamp effects of i split by whether k fires on the input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import JfigError
from ..models.validation import saes_by_site
from ..sites import site_key
from .api import clamp_levels, default_targets, measure_effects, prefix_pass
from .engine import Plan, clamp_mask, read_mask, read_targets, run_targets, weighted_stats
from .select import choose_inputs
from .types import FeatureList, feature_list, store_stats

GATING_METHODS = ("mixed", "factorial", "conditional")


@dataclass
class GatingEffects:
    """mean/var/n: [n_pairs, n_targets]; pairs[p] = ((site, i), (site, k))."""

    mean: np.ndarray
    var: np.ndarray
    n: np.ndarray
    pairs: list
    targets: FeatureList
    method: str
    positions: str
    extra: dict = field(default_factory=dict)


def _pair_values(model, plan, sae, tgt_saes, tcols, acts, resid, toks, fi, fk, fi_feat, fk_feat, lo_i, hi_i, lo_k, hi_k,
                 method):
    cm = clamp_mask(fi, plan.clamp_at)
    rm = read_mask(cm, plan.positions)
    stats = sae.encode_with_stats(acts)[1]
    di = jnp.broadcast_to(sae.decode_direction(fi_feat, stats), acts.shape)
    dk = jnp.broadcast_to(sae.decode_direction(fk_feat, stats), acts.shape)
    valid = (rm.sum(-1) > 0).astype(jnp.float32)

    def values(delta):
        return read_targets(plan, tgt_saes, tcols, run_targets(model, plan, acts, resid, toks, delta), rm)[0]

    if method == "mixed":
        ti, tk = cm[..., None] * di, cm[..., None] * dk

        def d_i(x):
            return jax.jvp(values, (x,), (ti,))[1]

        return jax.jvp(d_i, (jnp.zeros_like(acts),), (tk,))[1], valid
    # factorial: both set at i's clamp positions
    def delta(ai, ak):
        return cm[..., None] * ((ai - fi)[..., None] * di + (ak - fk)[..., None] * dk)

    runs = jax.vmap(values)(jnp.stack([delta(hi_i, hi_k), delta(hi_i, lo_k), delta(lo_i, hi_k), delta(lo_i, lo_k)]))
    d = (runs[0] - runs[1] - runs[2] + runs[3]) / ((hi_i - lo_i) * (hi_k - lo_k))
    return d, valid


@eqx.filter_jit
def _gating_chunk(model, plan, sae, tgt_saes, tcols, acts_all, resid_all, toks_all, vals_all, idx, weight, ci, ck,
                  fi_feat, fk_feat, lo_i, hi_i, lo_k, hi_k, method):
    def one(i, w, a, b, fa, fb, l1, h1, l2, h2):
        acts = acts_all[i]
        resid = None if resid_all is None else resid_all[i]
        toks = None if toks_all is None else toks_all[i]
        e, valid = _pair_values(model, plan, sae, tgt_saes, tcols, acts, resid, toks, vals_all[i, :, a],
                                vals_all[i, :, b], fa, fb, l1, h1, l2, h2, method)
        return weighted_stats(e, w * valid)

    return jax.vmap(one)(idx, weight, ci, ck, fi_feat, fk_feat, lo_i, hi_i, lo_k, hi_k)


def measure_gating(model, saes, pairs, tokens, *, method: str = "mixed", positions: str = "same", targets=None,
                   inputs_per_pair: int = 32, alphas=None, clamp_at: str = "single", batch_size: int = 32,
                   chunk_size: int = 8, seed: int = 0, progress: bool = False) -> GatingEffects:
    """Gating statistics for (i, k) source pairs at one site on every target feature.

    pairs: [((site, i), (site, k)), ...] — both features at the same site. method: "mixed",
    "factorial" or "conditional" (module docstring). Returns GatingEffects [n_pairs, n_targets].
    """
    if method not in GATING_METHODS:
        raise JfigError(f"unknown gating method {method!r}; expected one of {GATING_METHODS}")
    saes = saes_by_site(saes)
    pairs = [((str(a[0]), int(a[1])), (str(b[0]), int(b[1]))) for a, b in pairs]
    sites = {a[0] for a, _ in pairs} | {b[0] for _, b in pairs}
    if len(sites) != 1:
        raise JfigError(f"gating pairs must share one source site; got {sorted(sites)}")
    site = sites.pop()
    tgt = feature_list(targets, saes) if targets is not None else default_targets(saes, [site])
    if method == "conditional":
        return _conditional(model, saes, pairs, site, tokens, tgt, positions, inputs_per_pair, alphas, clamp_at,
                            batch_size, seed)
    feats = np.unique(np.asarray([p[0][1] for p in pairs] + [p[1][1] for p in pairs], np.int64))
    col = {int(f): c for c, f in enumerate(feats)}
    tokens = model.check_tokens(tokens)
    builtin = model.apply_fn is None
    tsites = tuple(sorted((s for s in tgt.unique_sites() if site_key(s) >= site_key(site)), key=site_key))
    tcols_idx = [tgt.at(s) for s in tsites]
    tcols = tuple(jnp.asarray(tgt.features[c], jnp.int32) for c in tcols_idx)
    plan = Plan(site, tsites, "clamp", positions, clamp_at, builtin)
    acts, resid, vals = prefix_pass(model, saes[site], feats, tokens, batch_size, builtin)
    vals_np = np.asarray(vals)
    lo, hi, med = clamp_levels("clamp", vals_np, alphas, None)
    ci = np.asarray([col[p[0][1]] for p in pairs], np.int32)
    ck = np.asarray([col[p[1][1]] for p in pairs], np.int32)
    idx_all, w_all = choose_inputs(vals_np.max(axis=1), med, inputs_per_pair, seed)
    idx, wgt = idx_all[ci], w_all[ci]
    order = np.concatenate(tcols_idx)
    P = len(pairs)
    mean = np.full((P, len(tgt)), np.nan, np.float32)
    var, count = np.full_like(mean, np.nan), np.zeros_like(mean)
    for start in range(0, P, chunk_size):
        sl = np.arange(start, min(start + chunk_size, P))
        pad = np.concatenate([sl, np.full(chunk_size - len(sl), sl[-1])])
        wpad = wgt[pad] * (np.arange(chunk_size) < len(sl))[:, None]
        n, mu, m2 = _gating_chunk(model, plan, saes[site], tuple(saes[s] for s in tsites), tcols, acts, resid,
                                  None if builtin else tokens, vals, jnp.asarray(idx[pad]), jnp.asarray(wpad),
                                  jnp.asarray(ci[pad]), jnp.asarray(ck[pad]), jnp.asarray(feats[ci[pad]], jnp.int32),
                                  jnp.asarray(feats[ck[pad]], jnp.int32), jnp.asarray(lo[ci[pad]]),
                                  jnp.asarray(hi[ci[pad]]), jnp.asarray(lo[ck[pad]]), jnp.asarray(hi[ck[pad]]), method)
        store_stats(mean, var, count, sl, order, *(np.asarray(x)[: len(sl)] for x in (n, mu, m2)))
    return GatingEffects(mean, var, count, pairs, tgt, method, positions)


def _conditional(model, saes, pairs, site, tokens, tgt, positions, m, alphas, clamp_at, batch_size, seed):
    sources = sorted({p[0] for p in pairs}, key=lambda x: x[1])
    eff = measure_effects(model, saes, sources, tokens, method="clamp", positions=positions, targets=tgt,
                          inputs_per_source=m, alphas=alphas, clamp_at=clamp_at, batch_size=batch_size,
                          keep_per_input=True, seed=seed, progress=False)
    row = {s: r for r, s in enumerate(eff.sources)}
    toks = model.check_tokens(tokens)
    ks = np.unique(np.asarray([p[1][1] for p in pairs], np.int64))
    _, _, kvals = prefix_pass(model, saes[site], ks, toks, batch_size, model.apply_fn is None)
    k_on = np.asarray(kvals).max(axis=1) > 0                                    # [N, n_k]
    kcol = {int(k): c for c, k in enumerate(ks)}
    P = len(pairs)
    mean = np.full((P, len(tgt)), np.nan, np.float32)
    var, count = np.full_like(mean, np.nan), np.zeros_like(mean)
    for p, (a, b) in enumerate(pairs):  # host-side split of already-measured per-input effects
        r = row[a]
        w = eff.input_weight[r] > 0
        on = k_on[eff.input_index[r], kcol[b[1]]] & w
        off = ~k_on[eff.input_index[r], kcol[b[1]]] & w
        if on.any() and off.any():
            e = eff.per_input[r]
            mean[p] = np.abs(e[on].mean(0) - e[off].mean(0))
            var[p] = e[on].var(0) / on.sum() + e[off].var(0) / off.sum()
        count[p] = w.sum()
    return GatingEffects(mean, var, count, pairs, tgt, "conditional", positions,
                         extra={"n_active": None})
