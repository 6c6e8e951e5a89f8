"""Second-order (gating) measurements: does modulator k change how source i drives target j?

A pair is ((site_i, i), (site_k, k)) with k's site at or before i's. On inputs where i fires at or
above its median, i is clamped at its clamp positions (`clamp_at`, as in first-order measurements)
and k is edited at the same token positions at its own site; targets are read where `positions`
says, relative to i's clamp positions, as post-activations or pre-activations (`read`).

- ``mixed``: ∂²f_j/∂α_i∂α_k at the natural operating point, forward-over-forward (jvp of jvp);
- ``factorial``: the 2×2 clamp contrast [f(hi,hi) − f(hi,lo) − f(lo,hi) + f(lo,lo)] / (Δα_i·Δα_k),
  the interaction term of a 2×2 factorial design, in the units of the mixed derivative;
- ``conditional``: I(i→j | k active) − I(i→j | k inactive), from i's per-input clamp slopes split by
  whether k is active at i's clamp positions of that input (G_k is its absolute value).

Every method returns per-input values whose mean is the statistic: for ``conditional`` the value of
input m is e_m·(on_m/p_on − off_m/p_off), e_m i's slope on j and p_on the fraction of inputs with k
active, so `var` is always the variance across inputs of the per-input statistic.

When k sits at an earlier site than i, k's edit is applied first (at its site) and i is then *set* to
its level at its own site on the already-edited activations (`SetFeature`): k's effect that runs
through i itself is removed, so what remains is k changing how i acts on j. Same-site pairs use a
faster path (one delta at the shared site), which is the same edit when d_i and d_k do not overlap
in the encoder.

`direction="random"` replaces k's decoder direction by a random direction with its norm (one per
feature and seed): the null control for the size of gating statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Edit, Steer
from ..errors import JfigError
from ..models.model import Prefix
from ..saes.transcoder import Transcoder
from .api import clamp_levels, measure_effects
from .prefix import CleanPrefix, prefix_pass
from .engine import (CLAMP_AT, POSITION_MODES, READS, Plan, at_clamp_position, clamp_mask, input_cache,
                     random_direction, read_mask, read_targets, run_targets, weighted_stats)
from .select import choose_inputs
from .sources import check_dictionaries
from .types import FeatureList, feature_list, store_stats

GATING_METHODS = ("mixed", "factorial", "conditional")


@dataclass
class GatingEffects:
    """mean/var/n: [n_pairs, n_targets]; pairs[p] = ((site_i, i), (site_k, k)).

    var is the (unbiased) variance across inputs of the per-input statistic, for every method.
    per_input [n_pairs, M, n_targets] and input_weight [n_pairs, M] when kept (always for
    "conditional", whose `slopes` [n_pairs, M, n_targets] and `k_active` [n_pairs, M] feed the
    label-permutation test).
    """

    mean: np.ndarray
    var: np.ndarray
    n: np.ndarray
    pairs: list
    targets: FeatureList
    method: str
    positions: str
    per_input: np.ndarray | None = None
    input_weight: np.ndarray | None = None
    slopes: np.ndarray | None = None
    k_active: np.ndarray | None = None
    options: dict = field(default_factory=dict)


class SetFeature(Edit):
    """Set one SAE feature to per-position values where `mask` is 1, keeping the SAE error:
    x + mask·(value − f(x))·d. value and mask are [batch, seq]; f is read from the activations the
    edit receives (after earlier edits)."""

    sae: Any
    feature: jax.Array
    value: jax.Array
    mask: jax.Array

    def __init__(self, sae, feature, value, mask):
        self.sae = sae
        self.feature = jnp.asarray(feature, jnp.int32)
        self.value = jnp.asarray(value, jnp.float32)
        self.mask = jnp.asarray(mask, jnp.float32)

    @property
    def site(self) -> str:
        return self.sae.site

    def apply(self, x, pos_axis: int = 1):
        f, stats = self.sae.encode_with_stats(x)
        d = jnp.broadcast_to(self.sae.decode_direction(self.feature, stats), x.shape)
        cur = jnp.take(f, self.feature, axis=-1)
        return x + (self.mask * (self.value - cur))[..., None] * d


def _k_direction(sae, feat, stats, shape, direction, seed):
    d = jnp.broadcast_to(sae.decode_direction(feat, stats), shape)
    return random_direction(d, feat, seed) if direction == "random" else d


def _same_site_values(model, plan, sae, tgt_saes, tcols, acts, resid, toks, fi, fk, fi_feat, fk_feat, lo_i, hi_i,
                      lo_k, hi_k, method, direction, seed, kv=None, positions=None):
    cm = clamp_mask(fi, plan.clamp_at)
    rm = read_mask(cm, plan.positions)
    stats = sae.encode_with_stats(acts)[1]
    di = jnp.broadcast_to(sae.decode_direction(fi_feat, stats), acts.shape)
    dk = _k_direction(sae, fk_feat, stats, acts.shape, direction, seed)
    valid = (rm.sum(-1) > 0).astype(jnp.float32)

    def values(delta):
        return read_targets(plan, tgt_saes, tcols, run_targets(model, plan, acts, resid, toks, delta, kv, positions),
                            rm)[0]

    if method == "mixed":
        ti, tk = cm[..., None] * di, cm[..., None] * dk

        def d_i(x):
            return jax.jvp(values, (x,), (ti,))[1]

        return jax.jvp(d_i, (jnp.zeros_like(acts),), (tk,))[1], valid

    def delta(ai, ak):  # factorial: both set at i's clamp positions
        return cm[..., None] * ((ai - fi)[..., None] * di + (ak - fk)[..., None] * dk)

    runs = jax.vmap(values)(jnp.stack([delta(hi_i, hi_k), delta(hi_i, lo_k), delta(lo_i, hi_k), delta(lo_i, lo_k)]))
    return (runs[0] - runs[1] - runs[2] + runs[3]) / ((hi_i - lo_i) * (hi_k - lo_k)), valid


def _cross_site_values(model, plan, sae_k, sae_i, tgt_saes, tcols, acts, resid, toks, fi, fk, fi_feat, fk_feat,
                       lo_i, hi_i, lo_k, hi_k, method, direction, seed, kv=None, positions=None):
    """k edited at its (earlier) site plan.source_site, then i set at its own site on the edited run."""
    cm = clamp_mask(fi, plan.clamp_at)
    rm = read_mask(cm, plan.positions)
    stats = sae_k.encode_with_stats(acts)[1]
    dk = _k_direction(sae_k, fk_feat, stats, acts.shape, direction, seed)

    def values(delta_k, value_i):
        edit = SetFeature(sae_i, fi_feat, value_i, cm)
        if plan.builtin:
            out = model.run_suffix(Prefix(plan.source_site, acts + delta_k, resid, kv), edits=(edit,),
                                   capture=plan.target_sites, stop_at=plan.stop_site, positions=positions)
        else:
            out = model.run(toks, edits=(Steer(plan.source_site, delta_k, 1.0), edit), capture=plan.target_sites,
                            stop_at=plan.stop_site)
        return read_targets(plan, tgt_saes, tcols, out.cache, rm)[0]

    valid = (rm.sum(-1) > 0).astype(jnp.float32)
    if method == "mixed":
        def at(eps_i, eps_k):
            return values(eps_k * cm[..., None] * dk, fi + eps_i)

        def d_i(eps_k):
            return jax.jvp(lambda e: at(e, eps_k), (jnp.float32(0.0),), (jnp.float32(1.0),))[1]

        return jax.jvp(d_i, (jnp.float32(0.0),), (jnp.float32(1.0),))[1], valid

    def run(ai, ak):
        return values(cm[..., None] * (ak - fk)[..., None] * dk, jnp.full_like(fi, ai))

    d = run(hi_i, hi_k) - run(hi_i, lo_k) - run(lo_i, hi_k) + run(lo_i, lo_k)
    return d / ((hi_i - lo_i) * (hi_k - lo_k)), valid


@eqx.filter_jit
def _gating_chunk(model, plan, sae_k, sae_i, tgt_saes, tcols, acts_all, resid_all, toks_all, vals_i, vals_k, idx,
                  weight, ci, ck, fi_feat, fk_feat, lo_i, hi_i, lo_k, hi_k, method, direction, seed, kv_all=None):
    def one(i, w, a, b, fa, fb, l1, h1, l2, h2):
        acts = acts_all[i]
        resid = None if resid_all is None else resid_all[i]
        toks = None if toks_all is None else toks_all[i]
        fi, fk = vals_i[i, :, a], vals_k[i, :, b]
        kv, positions = input_cache(kv_all, i), None
        if plan.position_sparse:       # only i's clamp position runs (engine.at_clamp_position)
            p, (acts, resid, fi, fk) = at_clamp_position(fi, acts, resid, fi, fk)
            positions = p[:, None]
        if sae_i is None:
            e, valid = _same_site_values(model, plan, sae_k, tgt_saes, tcols, acts, resid, toks, fi, fk, fa, fb, l1,
                                         h1, l2, h2, method, direction, seed, kv, positions)
        else:
            e, valid = _cross_site_values(model, plan, sae_k, sae_i, tgt_saes, tcols, acts, resid, toks, fi, fk, fa,
                                          fb, l1, h1, l2, h2, method, direction, seed, kv, positions)
        return (*weighted_stats(e, w * valid), e, w * valid)

    return jax.vmap(one)(idx, weight, ci, ck, fi_feat, fk_feat, lo_i, hi_i, lo_k, hi_k)


def _check(name, value, allowed):
    if value not in allowed:
        raise JfigError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")


def measure_gating(model, saes, pairs, tokens, *, method: str = "mixed", positions: str = "same", targets=None,
                   inputs_per_pair: int = 32, alphas=None, atlas=None, clamp_at: str = "single", read: str = "post",
                   direction: str = "decoder", batch_size: int = 32, chunk_size: int = 8, seed: int = 0,
                   keep_per_input: bool = False, sparse: bool = True, clean: CleanPrefix | None = None,
                   progress: bool = False) -> GatingEffects:
    """Gating statistics for (source i, modulator k) pairs on every target feature.

    pairs: [((site_i, i), (site_k, k)), ...]; k's site must be i's or an earlier one. method:
    "mixed", "factorial" or "conditional" (module docstring). positions, clamp_at and read mean
    what they mean in `measure_effects`. α levels: `alphas` (lo, hi) for every feature, else the
    atlas's 10th/90th percentiles of non-zero activations at each feature's site, else those of
    the inputs. direction: "decoder" or "random" (k's direction replaced by a random one of the
    same norm: the null control; not for "conditional", which does not edit k). sparse: run only
    i's clamp position where `measure_effects` would (the same numbers; False runs every position).
    clean: a CleanPrefix of these tokens, shared with other measurements on them.
    Returns GatingEffects [n_pairs, n_targets].
    """
    _check("gating method", method, GATING_METHODS)
    _check("positions mode", positions, POSITION_MODES)
    _check("clamp_at", clamp_at, CLAMP_AT)
    _check("read", read, READS)
    _check("direction", direction, ("decoder", "random"))
    if method == "conditional" and direction == "random":
        raise JfigError("direction='random' edits the modulator; the conditional statistic never edits it "
                        "(use method='mixed' or 'factorial' for the random-modulator null)")
    saes = check_dictionaries(model, saes)
    pairs = [((str(a[0]), int(a[1])), (str(b[0]), int(b[1]))) for a, b in pairs]
    if not pairs:
        raise JfigError("no gating pairs given; expected [((site_i, i), (site_k, k)), ...]")
    order = {s: n for n, s in enumerate(model.sites)}
    for (si, _), (sk, _) in pairs:
        for s in (si, sk):
            if s not in saes:
                raise JfigError(f"no SAE for site {s!r} of a gating pair; SAEs are at {sorted(saes)}")
            if method != "conditional" and isinstance(saes[s], Transcoder):
                raise JfigError(f"gating method {method!r} edits source and modulator at their own sites; the "
                                f"transcoder at {s} writes elsewhere ({saes[s].out_site}), which this method "
                                f"does not support yet. Use method='conditional' (it clamps the source as "
                                f"measure_effects does and only reads the modulator)")
        if order[sk] > order[si]:
            raise JfigError(f"modulator site {sk!r} comes after source site {si!r}; the modulator must sit at the "
                            f"source's site or an earlier one (swap the pair)")
    first = min((order[a[0]] for a, _ in pairs))
    tgt = feature_list(targets, saes) if targets is not None else feature_list(
        {s: np.arange(saes[s].d_sae) for s in model.sites if s in saes and order[s] >= first}, saes)
    tokens = model.check_tokens(tokens)
    opts = dict(inputs_per_pair=inputs_per_pair, clamp_at=clamp_at, read=read, direction=direction, seed=seed)
    if method == "conditional":
        return _conditional(model, saes, pairs, tokens, tgt, positions, inputs_per_pair, alphas, atlas, clamp_at, clean,
                            read, batch_size, seed, opts)
    P, T, M = len(pairs), len(tgt), inputs_per_pair
    mean = np.full((P, T), np.nan, np.float32)
    var, count = np.full_like(mean, np.nan), np.zeros_like(mean)
    per_input = np.zeros((P, M, T), np.float32) if keep_per_input else None
    in_w = np.zeros((P, M), np.float32)
    groups: dict[tuple[str, str], list[int]] = {}
    for p, ((si, _), (sk, _)) in enumerate(pairs):
        groups.setdefault((si, sk), []).append(p)
    builtin = model.apply_fn is None
    for (si, sk), rows in sorted(groups.items(), key=lambda kv: (order[kv[0][1]], order[kv[0][0]])):
        rows = np.asarray(rows)
        tsites = tuple(s for s in model.sites if s in tgt.unique_sites() and order[s] >= order[si])
        if not tsites:
            continue
        tcols_idx = [tgt.at(s) for s in tsites]
        tcols = tuple(jnp.asarray(tgt.features[c], jnp.int32) for c in tcols_idx)
        plan = Plan(sk, tsites, "clamp", positions, clamp_at, builtin, read=read, sparse=sparse)
        fi_all = np.unique(np.asarray([pairs[p][0][1] for p in rows], np.int64))
        fk_all = np.unique(np.asarray([pairs[p][1][1] for p in rows], np.int64))
        same = si == sk
        feats_k = np.unique(np.concatenate([fi_all, fk_all])) if same else fk_all
        acts, resid, vals_k, kv = prefix_pass(model, saes[sk], feats_k, tokens, batch_size, builtin,
                                              cache=plan.position_sparse, clean=clean)
        vals_i = vals_k if same else prefix_pass(model, saes[si], fi_all, tokens, batch_size, builtin, clean=clean)[2]
        feats_i = feats_k if same else fi_all
        levels_i = clamp_levels("clamp", np.asarray(vals_i), alphas,
                                None if atlas is None else atlas.alpha_levels(si)[feats_i])
        levels_k = clamp_levels("clamp", np.asarray(vals_k), alphas,
                                None if atlas is None else atlas.alpha_levels(sk)[feats_k])
        col_i = {int(f): c for c, f in enumerate(feats_i)}
        col_k = {int(f): c for c, f in enumerate(feats_k)}
        ci = np.asarray([col_i[pairs[p][0][1]] for p in rows], np.int32)
        ck = np.asarray([col_k[pairs[p][1][1]] for p in rows], np.int32)
        idx_all, w_all = choose_inputs(np.asarray(vals_i).max(axis=1), levels_i[2], M, seed)
        idx, wgt = idx_all[ci], w_all[ci]
        tcol_order = np.concatenate(tcols_idx)
        C = min(chunk_size, len(rows))
        for start in range(0, len(rows), C):
            sl = np.arange(start, min(start + C, len(rows)))
            pad = np.concatenate([sl, np.full(C - len(sl), sl[-1])])
            wpad = wgt[pad] * (np.arange(C) < len(sl))[:, None]
            a, b = ci[pad], ck[pad]
            n, mu, m2, e, wv = _gating_chunk(
                model, plan, saes[sk], None if same else saes[si], tuple(saes[s] for s in tsites), tcols, acts,
                resid, None if builtin else tokens, vals_i, vals_k, jnp.asarray(idx[pad]), jnp.asarray(wpad),
                jnp.asarray(a), jnp.asarray(b), jnp.asarray(feats_i[a], jnp.int32), jnp.asarray(feats_k[b], jnp.int32),
                jnp.asarray(levels_i[0][a]), jnp.asarray(levels_i[1][a]), jnp.asarray(levels_k[0][b]),
                jnp.asarray(levels_k[1][b]), method, direction, seed, kv)
            r = rows[sl]
            store_stats(mean, var, count, r, tcol_order, *(np.asarray(x)[: len(sl)] for x in (n, mu, m2)))
            in_w[r] = np.asarray(wv)[: len(sl)]
            if keep_per_input:
                per_input[np.ix_(r, np.arange(M), tcol_order)] = np.asarray(e)[: len(sl)]
    return GatingEffects(mean, var, count, pairs, tgt, method, positions, per_input=per_input,
                         input_weight=in_w if keep_per_input else None, options=opts)


def _conditional(model, saes, pairs, tokens, tgt, positions, m, alphas, atlas, clamp_at, clean, read, batch_size, seed,
                 opts):
    sources = sorted({p[0] for p in pairs}, key=lambda x: (model.sites.index(x[0]), x[1]))
    eff = measure_effects(model, saes, sources, tokens, method="clamp", positions=positions, targets=tgt,
                          inputs_per_source=m, alphas=alphas, atlas=atlas, clamp_at=clamp_at, read=read,
                          batch_size=batch_size, keep_per_input=True, seed=seed, clean=clean, progress=False)
    row = {s: r for r, s in enumerate(eff.sources)}
    builtin = model.apply_fn is None
    values = {}                                   # site -> (features, their values [N, S, n])
    for site in sorted({a[0] for a, _ in pairs} | {b[0] for _, b in pairs}):
        feats = np.unique(np.asarray([f for s, f in sum(([a, b] for a, b in pairs), []) if s == site], np.int64))
        values[site] = (feats, np.asarray(prefix_pass(model, saes[site], feats, tokens, batch_size, builtin,
                                                      clean=clean)[2]))

    def feature_values(site, f, idx):
        feats, v = values[site]
        return v[idx, :, int(np.searchsorted(feats, f))]           # [M, S]

    P, T = len(pairs), len(tgt)
    mean = np.full((P, T), np.nan, np.float32)
    var, count = np.full_like(mean, np.nan), np.zeros_like(mean)
    per_input, slopes = np.zeros((P, m, T), np.float32), np.zeros((P, m, T), np.float32)
    in_w, k_active = np.zeros((P, m), np.float32), np.zeros((P, m), bool)
    for p, (a, b) in enumerate(pairs):  # host-side split of i's measured per-input slopes
        r = row[a]
        idx = eff.input_index[r]
        cm = np.asarray(clamp_mask(jnp.asarray(feature_values(*a, idx)), clamp_at)) > 0     # i's clamp positions
        on = (cm & (feature_values(*b, idx) > 0)).any(-1)                                  # k active there
        w = eff.input_weight[r] > 0
        e = np.nan_to_num(eff.per_input[r])
        slopes[p], k_active[p], in_w[p] = e, on, w
        n_on, n_off = (on & w).sum(), (~on & w).sum()
        count[p] = w.sum()
        if n_on == 0 or n_off == 0:
            continue
        n = w.sum()
        z = e * ((on & w) / (n_on / n) - (~on & w) / (n_off / n))[:, None]
        per_input[p] = z
        mean[p] = z[w].mean(0)
        var[p] = z[w].var(0, ddof=1) if n > 1 else np.nan
    return GatingEffects(mean, var, count, pairs, tgt, "conditional", positions, per_input=per_input,
                         input_weight=in_w, slopes=slopes, k_active=k_active, options=opts)
