"""Feature importance for candidate selection: how much the model's next-token predictions change
when a feature is ablated where it is active (exact, by ablation), or its first-order estimate
from one backward pass per batch (attribution)."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..data.progress import progress_bar
from ..edits import Ablate, Steer
from ..errors import JfigError, ShapeError
from ..models.model import Prefix

IMPORTANCE_KINDS = ("loss", "kl", "attribution", "rate")


@partial(jax.jit, static_argnames=("site", "kind", "builtin"))
def _ablation_chunk(model, sae, acts, resid, tokens, rowmask, base_logits, feats, *, site, kind, builtin):
    """For each feature in `feats [c]`: (sum over tokens of |Δ next-token loss| or KL, active count)."""
    f_src = sae.encode(acts)                                                     # [b, s, d_sae]
    base = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)          # [b, s, V]
    nxt = tokens[:, 1:, None]
    base_nll = -jnp.take_along_axis(base[:, :-1], nxt, axis=-1)[..., 0]          # [b, s-1]

    def one(f):
        mask = (f_src[..., f] > 0) & rowmask[:, None]                            # [b, s]
        edit = Ablate(sae, f, positions=mask)
        if builtin:
            logits = model.run_suffix(Prefix(site, acts, resid), edits=(edit,), logits=True).logits
        else:
            logits = model.run(tokens, edits=(edit,)).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if kind == "kl":
            d = jnp.sum(jnp.exp(base) * (base - logp), axis=-1)                 # [b, s]
        else:
            d = jnp.abs(-jnp.take_along_axis(logp[:, :-1], nxt, axis=-1)[..., 0] - base_nll)
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
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] < 2:
        raise ShapeError(f"tokens must be an int array [n_seq, seq >= 2], got {tokens.dtype} {tokens.shape}")
    feats = np.asarray(features, np.int32).reshape(-1)
    builtin = model.config is not None
    b = min(batch_size, len(tokens))
    if chunk is None:
        per = b * tokens.shape[1] * (4 * (model.vocab_size or 1) + 64 * sae.d_in) * 4
        chunk = max(1, min(len(feats), memory_budget // per))
    totals, counts = np.zeros(len(feats)), np.zeros(len(feats), np.int64)
    bar = progress_bar(-(-len(tokens) // b) * len(feats), desc=f"ablation {sae.site}", unit="feature",
                       enabled=progress)
    for r in range(0, len(tokens), b):
        tb = tokens[r:r + b]
        rows = len(tb)
        tb = jnp.asarray(np.concatenate([tb, np.zeros((b - rows, tb.shape[1]), tb.dtype)]), jnp.int32)
        rowmask = jnp.arange(b) < rows
        base_logits = model.run(tb).logits
        if builtin:
            pre = model.prefix(tb, sae.site)
            acts, resid = pre.acts, pre.resid
        else:
            acts, resid = model.run(tb, capture=(sae.site,), logits=False).cache[sae.site], None
        for c in range(0, len(feats), chunk):
            fc = feats[c:c + chunk]
            padded = jnp.asarray(np.concatenate([fc, np.full(chunk - len(fc), fc[0], np.int32)]))
            tot, n = _ablation_chunk(model, sae, acts, resid, tb, rowmask, base_logits, padded,
                                     site=sae.site, kind=kind, builtin=builtin)
            totals[c:c + len(fc)] += np.asarray(tot)[:len(fc)]
            counts[c:c + len(fc)] += np.asarray(n)[:len(fc)]
            bar.update(len(fc))
    bar.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan), counts


@partial(jax.jit, static_argnames=("site",))
def _attribution_batch(model, sae, tb, rowmask, feats, *, site):
    def loss(delta):
        logits = model.run(tb, edits=(Steer(site, delta, 1.0),)).logits
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, tb[:, 1:, None], -1)[..., 0]
        return (nll * rowmask[:, None]).sum()

    acts = model.run(tb, capture=(site,), stop_at=site).cache[site]
    g = jax.grad(loss)(jnp.zeros_like(acts))                              # dLoss/dh at the site
    f, stats = sae.encode_with_stats(acts)
    f = jnp.take(f, feats, -1) * rowmask[:, None, None]                   # [b, s, n]
    dirs = jax.vmap(lambda i: sae.decode_direction(i, stats))(feats)      # [n, ..., d]
    dirs = jnp.broadcast_to(dirs.reshape(len(feats), *dirs.shape[1:-1], -1), (len(feats),) + acts.shape[:2] + (-1,)) \
        if dirs.ndim > 2 else jnp.broadcast_to(dirs[:, None, None, :], (len(feats),) + acts.shape)
    lin = jnp.einsum("bsd,nbsd->bsn", g.reshape(*acts.shape[:2], -1), dirs.reshape(len(feats), *acts.shape[:2], -1))
    per_seq = jnp.abs((lin * f).sum(1))                                   # |first-order Δloss| per sequence
    return per_seq.sum(0), (f > 0).sum((0, 1))


def attribution_effects(model, sae, tokens, features, *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """First-order estimate of `ablation_effects(kind="loss")` from one backward pass per batch.

    For feature i and each sequence, the change in total next-token loss from ablating i at its
    active positions is estimated as Σ_p (∂loss/∂h_p) · (f_i,p d_i) (attribution patching); the
    effect is Σ over sequences of its absolute value, divided by i's active positions. Exact when
    the model is linear in the site; otherwise a fast ranking proxy for the ablation effect.
    """
    tokens = np.asarray(tokens)
    feats = jnp.asarray(np.asarray(features, np.int32).reshape(-1))
    b = min(batch_size, len(tokens))
    totals, counts = np.zeros(len(feats)), np.zeros(len(feats), np.int64)
    for r in range(0, len(tokens), b):
        tb = tokens[r:r + b]
        rows = len(tb)
        tb = jnp.asarray(np.concatenate([tb, np.zeros((b - rows, tb.shape[1]), tb.dtype)]), jnp.int32)
        tot, n = _attribution_batch(model, sae, tb, (jnp.arange(b) < rows).astype(jnp.float32), feats,
                                    site=sae.site)
        totals += np.asarray(tot)
        counts += np.asarray(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan), counts


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
                                                  batch_size=batch_size)
    elif len(measured):
        effect[measured], _ = ablation_effects(model, sae, tokens, atlas.features[site][measured], kind=kind,
                                               batch_size=batch_size, chunk=chunk, progress=progress)
    return effect
