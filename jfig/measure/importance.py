"""Feature importance for candidate selection: how much the model's next-token predictions change
when a feature is ablated where it is active (exact, by ablation), or the first-order estimate of
each token's change from one forward-mode jvp per feature (attribution)."""
from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..data.progress import progress_bar
from ..edits import Ablate, Edit
from ..errors import JfigError, ShapeError
from ..models.model import Prefix
from .prefix import values_input
from .sources import TranscoderSource, clamp_source, later_sites, value_site

IMPORTANCE_KINDS = ("loss", "kl", "attribution", "rate")


def _next_token_nll(logits, tokens):
    """-log p(tokens[:, t+1] | ..t) [b, s-1] from logits [b, s, V], in at least float32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def ablation_edits(sae, f, mask, f_src, stats=None) -> tuple:
    """The edits that ablate feature f where `mask` [b, s] is set: an SAE's error-preserving Ablate, or
    for a transcoder source (`TranscoderSource`) x − f_i·W_dec[i] at every site it writes."""
    if not isinstance(sae, TranscoderSource):
        return (Ablate(sae, f, positions=mask),)
    c = jnp.where(mask, -f_src[..., f], 0.0)[..., None]                         # [b, s, 1]
    rows = (sae.decode_direction(f),) + sae.later_directions(f)
    return tuple(_Shift(site, c * d) for site, d in zip((sae.site,) + sae.later_sites, rows))


@partial(jax.jit, static_argnames=("site", "kind", "builtin"))
def _ablation_chunk(model, sae, acts, vacts, resid, tokens, rowmask, base_logits, feats, *, site, kind, builtin):
    """For each feature in `feats [c]`: (sum over tokens of |Δ next-token loss| or KL, active count).
    acts: the activations at `site` (where the edit starts), vacts those the features are read from."""
    f_src = sae.encode(vacts)                                                    # [b, s, d_sae]
    base = jax.nn.log_softmax(base_logits.astype(jnp.promote_types(base_logits.dtype, jnp.float32)), axis=-1)
    base_nll = _next_token_nll(base_logits, tokens)                              # [b, s-1]

    def one(f):
        mask = (f_src[..., f] > 0) & rowmask[:, None]                            # [b, s]
        edits = ablation_edits(sae, f, mask, f_src)
        if builtin:
            logits = model.run_suffix(Prefix(site, acts, resid), edits=edits, logits=True).logits
        else:
            logits = model.run(tokens, edits=edits).logits
        if kind == "kl":
            logp = jax.nn.log_softmax(logits.astype(base.dtype), axis=-1)
            d = jnp.sum(jnp.exp(base) * (base - logp), axis=-1)                 # [b, s]
        else:
            d = jnp.abs(_next_token_nll(logits, tokens) - base_nll)              # [b, s-1]
        return jnp.sum(d * rowmask[:, None]), jnp.sum(mask)
    return jax.vmap(one)(feats)


def ablation_effects(model, sae, tokens, features, *, kind: str = "loss", batch_size: int = 8,
                     chunk: int | None = None, memory_budget: int = 1 << 30,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Downstream causal effect of ablating each feature where it is active.

    For feature i: ablate i (error-preserving clamp to 0) at every position where it is active,
    and sum over all next-token predictions of ``|loss_ablated - loss|`` (kind="loss") or of
    ``KL(p || p_ablated)`` (kind="kl"); divide by the number of active positions. Returns
    ``(effect [n], n_active [n])``; effect is nan where the feature never fires on `tokens`.
    Features are vmapped in chunks (sized to `memory_budget` when `chunk` is None); built-in
    models run the prefix to the SAE site once per batch and vmap only the suffix.
    """
    if kind not in ("loss", "kl"):
        raise ValueError(f"kind must be 'loss' or 'kl', got {kind!r}")
    return _effects(model, sae, tokens, features, kind=kind, batch_size=batch_size, chunk=chunk,
                    memory_budget=memory_budget, progress=progress)


def _effects(model, sae, tokens, features, *, kind, batch_size, chunk, memory_budget, progress):
    """Batches of `tokens` x padded chunks of `features` for kind "loss", "kl" or "attribution"."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] < 2:
        raise ShapeError(f"tokens must be an int array [n_seq, seq >= 2], got {tokens.dtype} {tokens.shape}")
    feats = np.asarray(features, np.int32).reshape(-1)
    if len(feats) == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    sae = clamp_source(sae)                      # a transcoder: edited where it writes, read where it reads
    vsite = value_site(sae)
    builtin = model.config is not None
    b = min(batch_size, len(tokens))
    if chunk is None:
        per = b * tokens.shape[1] * (4 * (model.vocab_size or 1) + 64 * sae.d_in) * 4
        chunk = max(1, min(len(feats), memory_budget // per))
    totals, counts = np.zeros(len(feats)), np.zeros(len(feats), np.int64)
    bar = progress_bar(-(-len(tokens) // b) * len(feats), desc=f"{kind} {sae.site}", unit="feature",
                       enabled=progress)
    for r in range(0, len(tokens), b):
        tb = tokens[r:r + b]
        rows = len(tb)
        tb = jnp.asarray(np.concatenate([tb, np.zeros((b - rows, tb.shape[1]), tb.dtype)]), jnp.int32)
        rowmask = jnp.arange(b) < rows
        if builtin:
            pre = model.prefix(tb, sae.site)
            acts, resid = pre.acts, pre.resid
            vacts = acts if vsite == sae.site else values_input(model, tb, pre, vsite)   # resid_mid: no extra run
        else:
            cache = model.run(tb, capture=tuple(dict.fromkeys((sae.site, vsite))), stop_at=sae.site).cache
            acts, vacts, resid = cache[sae.site], cache[vsite], None
        base_logits = model.run(tb, logits=True).logits if kind != "attribution" else None
        for c in range(0, len(feats), chunk):
            fc = feats[c:c + chunk]
            padded = jnp.asarray(np.concatenate([fc, np.full(chunk - len(fc), fc[0], np.int32)]))
            if kind == "attribution":
                tot, n = _attribution_chunk(model, sae, acts, vacts, resid, tb, rowmask, padded, site=sae.site,
                                            builtin=builtin)
            else:
                tot, n = _ablation_chunk(model, sae, acts, vacts, resid, tb, rowmask, base_logits, padded,
                                         site=sae.site, kind=kind, builtin=builtin)
            totals[c:c + len(fc)] += np.asarray(tot)[:len(fc)]
            counts[c:c + len(fc)] += np.asarray(n)[:len(fc)]
            bar.update(len(fc))
    bar.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan), counts


class _Shift(Edit):
    """x + delta at `site`, in x's own dtype (the differentiable input of the attribution jvp)."""

    site_name: str = eqx.field(static=True)
    delta: jax.Array

    @property
    def site(self) -> str:
        return self.site_name

    def apply(self, x, pos_axis: int = 1):
        return x + self.delta.astype(x.dtype)


def source_values(sae, acts, vacts):
    """(features [b, s, d_sae], encoding statistics) of a source: an SAE encodes `acts`; a transcoder
    source encodes `vacts` (its input site) and has no statistics."""
    if isinstance(sae, TranscoderSource):
        return sae.encode(vacts), None
    return sae.encode_with_stats(acts)


@partial(jax.jit, static_argnames=("site", "builtin"))
def _attribution_chunk(model, sae, acts, vacts, resid, tokens, rowmask, feats, *, site, builtin):
    """For each feature in `feats [c]`: (Σ_t |first-order Δnll_t| over valid rows, active count)."""
    f_src, stats = source_values(sae, acts, vacts)                               # [b, s, d_sae]
    later = later_sites(sae)
    zero = (jnp.zeros_like(acts),) + tuple(jnp.zeros(acts.shape[:2] + (sae.d_in,), acts.dtype) for _ in later)

    def nll(deltas):                                                             # acts + delta -> [b, s-1]
        writes = tuple(_Shift(s, d) for s, d in zip(later, deltas[1:]))
        if builtin:
            logits = model.run_suffix(Prefix(site, acts + deltas[0], resid), edits=writes, logits=True).logits
        else:
            logits = model.run(tokens, edits=(_Shift(site, deltas[0]),) + writes).logits
        return _next_token_nll(logits, tokens)

    def one(f):
        mask = (f_src[..., f] > 0) & rowmask[:, None]                            # [b, s]
        d = sae.decode_direction(f, stats)                                       # [d_in] or [b, s, d_in]
        if d.shape[-1] != sae.d_in:                                              # hook_z: [..., heads, d_head]
            d = d.reshape(*d.shape[:-2], sae.d_in)
        coef = jnp.where(mask, -f_src[..., f], 0)[..., None]                     # the ablation's change of h
        tangent = ((coef * d).reshape(acts.shape).astype(acts.dtype),) + tuple(
            (coef * r).astype(acts.dtype) for r in (sae.later_directions(f) if later else ()))
        _, dnll = jax.jvp(nll, (zero,), (tangent,))
        return jnp.sum(jnp.abs(dnll) * rowmask[:, None]), jnp.sum(mask)
    return jax.vmap(one)(feats)


def attribution_effects(model, sae, tokens, features, *, batch_size: int = 8, chunk: int | None = None,
                        memory_budget: int = 1 << 30, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """First-order (tangent-line) estimate of `ablation_effects(kind="loss")`, same normalisation.

    For feature i the ablation moves the site's activations by Δh = -f_i d_i at the positions
    where i is active (d_i = `sae.decode_direction` with the encode stats, as `Ablate` uses). One
    forward-mode `jax.jvp` per feature pushes Δh through the rest of the model and gives
    J_t = ∂nll_t/∂h · Δh for every next-token prediction t at once: the linear estimate of Δnll_t,
    exact in the limit of a vanishing ablation (lim ε→0 Δnll_t(εΔh) / ε). The absolute value is
    taken per token, as in the exact measure: effect_i = Σ_t |J_t| / n_active_i. Returns
    ``(effect [n], n_active [n])``; effect is nan where the feature never fires on `tokens`.
    Features are vmapped in chunks (padded to `chunk`, sized to `memory_budget` when None) so the
    primal runs once per chunk; built-in models run the prefix once per batch and differentiate
    only the suffix, `from_function` models run the whole model.
    """
    return _effects(model, sae, tokens, features, kind="attribution", batch_size=batch_size, chunk=chunk,
                    memory_budget=memory_budget, progress=progress)


@partial(jax.jit, static_argnames=("sites",))
def _reverse_attribution_chunk(model, saes, tokens, rowmask, feats, t_index, *, sites):
    """Σ over valid rows and the predictions t in `t_index [C]` of |∂nll_t/∂h · Δh_i| for every feature
    of every dictionary (feats: one [n_s] array per dictionary at `sites`), from one vjp: C backward
    passes serve all of them. A transcoder source's Δh is at the sites it writes, its values read where
    it reads. Returns one [n_s] array per dictionary."""
    srcs = tuple(clamp_source(d) for d in saes)
    order = {s: i for i, s in enumerate(model.sites)}                          # the model's forward order
    writes = tuple(sorted({w for src in srcs for w in (src.site,) + later_sites(src)}, key=order.__getitem__))
    reads = tuple(value_site(src) for src in srcs)
    capture = tuple(sorted(set(writes) | set(reads), key=order.__getitem__))
    acts0 = model.run(tokens, capture=capture, stop_at=capture[-1]).cache      # clean activations per site

    def nll(deltas):                                                            # {site: delta} -> [b, s-1]
        edits = tuple(_Shift(site, deltas[site]) for site in writes)
        return _next_token_nll(model.run(tokens, edits=edits, logits=True).logits, tokens)

    zeros = {site: jnp.zeros_like(acts0[site]) for site in writes}
    out_nll, pullback = jax.vjp(nll, zeros)
    cot = jax.nn.one_hot(t_index, tokens.shape[1] - 1, dtype=out_nll.dtype)    # [C, s-1]
    cot = jnp.broadcast_to(cot[:, None, :], (len(t_index), tokens.shape[0], tokens.shape[1] - 1))
    grads = jax.vmap(lambda c: pullback(c)[0])(cot)                             # {site: [C, b, s, ...]}
    grads = {site: g.reshape(*g.shape[:3], -1) for site, g in grads.items()}   # [C, b, s, d]
    out = []
    for src, read, fs in zip(srcs, reads, feats):
        f_src, stats = source_values(src, acts0[src.site], acts0[read])
        targets = (src.site,) + later_sites(src)

        def one(f):
            mask = (f_src[..., f] > 0) & rowmask[:, None]
            d = src.decode_direction(f, stats)
            if d.shape[-1] != src.d_in:
                d = d.reshape(*d.shape[:-2], src.d_in)
            rows = (d,) + (src.later_directions(f) if later_sites(src) else ())
            coef = jnp.where(mask, -f_src[..., f], 0)[..., None]                # [b, s, 1]
            j = sum(jnp.einsum("cbsd,bsd->cb", grads[w], jnp.broadcast_to(coef * r, grads[w].shape[1:]))
                    for w, r in zip(targets, rows))                             # first-order Δnll_t per row
            return jnp.sum(jnp.abs(j) * rowmask[None, :])
        out.append(jax.vmap(one)(fs))
    return out


def attribution_by_site(model, saes, tokens, features: dict, *, batch_size: int = 8, t_chunk: int = 8,
                        progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`attribution_effects` of many features at several sites at once, by reverse mode: per batch of
    sequences, one vjp pulled back from each next-token prediction t (seq - 1 backward passes, t_chunk
    at a time) gives ∂nll_t/∂h at every site, and each feature's J_t = ∂nll_t/∂h · Δh_i is a dot
    product. Cheaper than one jvp per feature whenever there are more features than predictions.
    features: {site: feature ids}; returns {site: (effect [n], n_active [n])}, the same numbers."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] < 2:
        raise ShapeError(f"tokens must be an int array [n_seq, seq >= 2], got {tokens.dtype} {tokens.shape}")
    by_site = {sae.site: sae for sae in saes}
    missing = [s for s in features if s not in by_site]
    if missing:
        raise JfigError(f"no SAE given for site(s) {missing}; SAEs are at {sorted(by_site)}")
    sites = tuple(s for s in model.sites if s in features and len(features[s]))
    feats = [jnp.asarray(np.asarray(features[s], np.int32).reshape(-1)) for s in sites]
    sae_t = tuple(by_site[s] for s in sites)
    totals = [np.zeros(len(f)) for f in feats]
    counts = [np.zeros(len(f), np.int64) for f in feats]
    n_pred = tokens.shape[1] - 1
    t_chunk = max(1, min(t_chunk, n_pred))
    b = min(batch_size, len(tokens))
    steps = -(-len(tokens) // b) * -(-n_pred // t_chunk)
    with progress_bar(steps, desc="attribution (reverse)", unit="step", enabled=progress and bool(sites)) as bar:
        for r in range(0, len(tokens) if sites else 0, b):
            tb = tokens[r:r + b]
            rows = len(tb)
            tb = jnp.asarray(np.concatenate([tb, np.zeros((b - rows, tb.shape[1]), tb.dtype)]), jnp.int32)
            rowmask = jnp.arange(b) < rows
            acts = model.run(tb, capture=sites, stop_at=sites[-1]).cache     # the dictionaries' read sites
            for k, (site, sae, f) in enumerate(zip(sites, sae_t, feats)):
                active = (sae.encode(acts[site])[..., f] > 0) & rowmask[:, None, None]
                counts[k] += np.asarray(active.sum((0, 1)))
            for t0 in range(0, n_pred, t_chunk):
                t = np.arange(t0, t0 + t_chunk)
                t_index = jnp.asarray(np.where(t < n_pred, t, -1))      # -1 pads the last chunk: a zero cotangent
                sums = _reverse_attribution_chunk(model, sae_t, tb, rowmask, tuple(feats), t_index, sites=sites)
                for k, v in enumerate(sums):
                    totals[k] += np.asarray(v)
                bar.update(1)
    out = {}
    for site, tot, n in zip(sites, totals, counts):
        with np.errstate(invalid="ignore", divide="ignore"):
            out[site] = (np.where(n > 0, tot / n, np.nan), n)
    for site in features:
        if site not in out:
            out[site] = (np.zeros(0), np.zeros(0, np.int64))
    return out


def feature_importance(atlas, sae, model, tokens, *, kind: str = "loss", pool: int, batch_size: int = 8,
                       chunk: int | None = None, progress: bool = False) -> np.ndarray:
    """Downstream effect of each feature the atlas tracks at `sae.site`, [n_tracked] in the order of
    `atlas.features[sae.site]`: the effect of ablating it (kind "loss" or "kl", exact) or its
    first-order estimate (kind "attribution"), measured for the `pool` most frequent tracked features
    and NaN for the others (and for every feature with kind "rate", which measures nothing)."""
    if kind not in IMPORTANCE_KINDS:
        raise JfigError(f"importance must be one of {list(IMPORTANCE_KINDS)}, got {kind!r}")
    site = sae.site
    rate = atlas.firing_rate(site)[atlas.features[site]]
    effect = np.full(rate.shape, np.nan)
    if kind == "rate":
        return effect
    order = np.argsort(-rate, kind="stable")
    measured = order[rate[order] > 0][:pool]
    if len(measured) and kind == "attribution":
        effect[measured], _ = attribution_effects(model, sae, tokens, atlas.features[site][measured],
                                                  batch_size=batch_size, chunk=chunk, progress=progress)
    elif len(measured):
        effect[measured], _ = ablation_effects(model, sae, tokens, atlas.features[site][measured], kind=kind,
                                               batch_size=batch_size, chunk=chunk, progress=progress)
    return effect


def feature_importance_by_site(atlas, saes, model, tokens, *, kind: str = "loss", pool: int, batch_size: int = 8,
                               memory_budget: float = 2e9, progress: bool = False) -> dict[str, np.ndarray]:
    """`feature_importance` at every SAE's site: {site: effect [n_tracked]}. Attribution of more features
    than a sequence has next-token predictions runs in reverse mode over all sites at once
    (`attribution_by_site`, as many predictions per backward batch as `memory_budget` allows for their
    logit cotangents), otherwise one jvp per feature; the numbers are the same."""
    saes = list(saes)
    if kind != "attribution":
        return {sae.site: feature_importance(atlas, sae, model, tokens, kind=kind, pool=pool, batch_size=batch_size,
                                             progress=progress) for sae in saes}
    measured, out = {}, {}
    for sae in saes:
        rate = atlas.firing_rate(sae.site)[atlas.features[sae.site]]
        order = np.argsort(-rate, kind="stable")
        measured[sae.site] = order[rate[order] > 0][:pool]
        out[sae.site] = np.full(rate.shape, np.nan)
    n_features = sum(len(m) for m in measured.values())
    if n_features <= np.shape(tokens)[1] - 1:
        return {sae.site: feature_importance(atlas, sae, model, tokens, kind=kind, pool=pool, batch_size=batch_size,
                                             progress=progress) for sae in saes}
    feats = {s: atlas.features[s][m] for s, m in measured.items() if len(m)}
    b, seq = min(batch_size, len(tokens)), np.shape(tokens)[1]
    per_prediction = 4 * b * seq * (model.vocab_size or 1) * 4      # logits cotangent and its softmax terms
    t_chunk = int(max(1, min(8, memory_budget // per_prediction)))
    got = attribution_by_site(model, saes, tokens, feats, batch_size=batch_size, t_chunk=t_chunk, progress=progress)
    for site, (eff, _) in got.items():
        out[site][measured[site]] = eff
    return out
