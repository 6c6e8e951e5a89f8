"""Reverse-mode Jacobians: one backward pass per (target, position), shared by all sources.

Forward mode (engine.py) costs one jvp per source and input. When there are fewer
(target × position) outputs than sources — "what drives this feature?" — reverse mode is
cheaper: for a batch of inputs, `jax.vjp` of every target value at every position gives the
gradient with respect to the source-site activations, and each source's derivative is that
gradient dotted with its (masked) decoder direction. Inputs are shared: each source still
averages only over its own chosen inputs, so the result equals forward mode.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .engine import Plan, clamp_mask, read_mask, run_targets


@eqx.filter_jit
def reverse_batch(model, plan: Plan, src_sae, tgt_saes, tcols, acts, resid, toks, fvals, feats):
    """Per-input derivatives [n_src, B, n_t] and validity [n_src, B] for inputs acts [B, S, d]."""
    B, S = acts.shape[:2]

    def target_values(delta):                                       # [B, S, n_t]; d/d delta = d/d acts
        cache = run_targets(model, plan, acts, resid, toks, delta)
        read = (lambda sae, x: sae.encode(x)) if plan.read == "post" else (lambda sae, x: sae.pre_activations(x))
        return jnp.concatenate([jnp.take(read(sae, cache[s]), c, axis=-1)
                                for s, sae, c in zip(plan.target_sites, tgt_saes, tcols)], axis=-1)

    out, vjp_fn = jax.vjp(target_values, jnp.zeros_like(acts))
    n_t = out.shape[-1]

    def grad_of(tp):                                                # d out[:, p, t] / d acts
        t, p = tp // S, tp % S
        return vjp_fn(jnp.zeros_like(out).at[:, p, t].set(1.0))[0]

    G = jax.lax.map(grad_of, jnp.arange(n_t * S), batch_size=min(n_t * S, 16))
    G = G.reshape(n_t, S, *acts.shape)                              # [n_t, S_p, B, S_q, ...]
    stats = src_sae.encode_with_stats(acts)[1]
    dirs = jax.vmap(lambda i: jnp.broadcast_to(src_sae.decode_direction(i, stats).reshape(
        *src_sae.decode_direction(i, stats).shape[:-1], -1), (B, S, src_sae.d_in)))(feats)   # [n_src, B, S, d]
    cm = jax.vmap(lambda c: clamp_mask(fvals[:, :, c], plan.clamp_at))(jnp.arange(len(feats)))  # [n_src, B, S]
    rm = jax.vmap(lambda m: read_mask(m, plan.positions))(cm)
    Gf = G.reshape(n_t, S, B, S, -1)
    A = jnp.einsum("tpbqd,ibqd->itbp", Gf, dirs * cm[..., None])   # [n_src, n_t, B, S_p]
    denom = jnp.maximum(rm.sum(-1), 1.0)                            # [n_src, B]
    e = jnp.einsum("ibp,itbp->ibt", rm, A) / denom[..., None]
    return e, (rm.sum(-1) > 0).astype(jnp.float32)


def reverse_effects(model, plan, src_sae, tgt_saes, tcols, acts_all, resid_all, toks_all, vals, feats, idx, wgt,
                    batch: int = 8):
    """(n, mean, m2, per_input [n_src, M, n_t], weight [n_src, M]) over each source's chosen inputs."""
    n_src, M = idx.shape
    chosen = np.zeros((n_src, acts_all.shape[0]), np.float32)
    slot = np.full((n_src, acts_all.shape[0]), -1, np.int64)
    for i in range(n_src):  # host bookkeeping of which input fills which slot
        for m in range(M):
            if wgt[i, m] > 0:
                chosen[i, idx[i, m]] = 1.0
                slot[i, idx[i, m]] = m
    inputs = np.flatnonzero(chosen.any(0))
    per_input = np.zeros((n_src, M, sum(len(c) for c in tcols)), np.float32)
    weight = np.zeros((n_src, M), np.float32)
    pad_to = -(-len(inputs) // batch) * batch
    rows = np.concatenate([inputs, np.full(pad_to - len(inputs), inputs[0] if len(inputs) else 0)]).astype(np.int64)
    fj = jnp.asarray(feats, jnp.int32)
    for b0 in range(0, len(rows), batch):
        r = rows[b0: b0 + batch]
        e, valid = reverse_batch(model, plan, src_sae, tgt_saes, tcols, acts_all[r],
                                 None if resid_all is None else resid_all[r],
                                 None if toks_all is None else toks_all[r], vals[r], fj)
        e, valid = np.asarray(e), np.asarray(valid)
        for j, inp in enumerate(r[: max(0, min(batch, len(inputs) - b0))]):
            for i in np.flatnonzero(chosen[:, inp] > 0):
                per_input[i, slot[i, inp]] = e[i, j]
                weight[i, slot[i, inp]] = valid[i, j]
    n = weight.sum(1)
    mean = (weight[..., None] * per_input).sum(1) / np.maximum(n, 1)[:, None]
    m2 = (weight[..., None] * (per_input - mean[:, None]) ** 2).sum(1)
    return n, mean, m2, per_input, weight
