"""One pass over data for the neuron metrics: per pair, how often both features fire, their activation
ratios, and the MLP's interaction error at each co-occurring token, folded into fixed-size device state.

At a token with MLP input residual x (the block's `hook_resid_mid`), pre-activations z = norm(x) @ W
(+ bias), and the pair's contributions c_i = g·a_i·u_i, c_j = g·a_j·u_j (readin.py), the interaction
error at neuron m is the 2x2 contrast

    e_m = φ(z) − φ(z − c_i) − φ(z − c_j) + φ(z − c_i − c_j)

with φ the MLP's activation (act(up), or act(gate)·up for gated MLPs, on both maps' pre-activations).
It is 0 whenever either contribution is 0 at m (set exactly, rather than left to float32 rounding),
and for any activation that is linear over the pair.
The output error is e @ W_down, through Gemma-2's post-feedforward norm frozen at the token's scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..atlas import token_batches
from ..data.progress import progress_iter
from ..models.layers import activation, norm
from ..sites import block_site, site_key
from .readin import decode_scale, mm, norm_scale

STATE_KEYS = ("both", "r_ji", "r_ij", "err", "nerr", "bad")


@dataclass(frozen=True)
class StreamSpec:
    """Static shape of the pass (a jit cache key)."""

    site: str           # the SAE's site
    mid: str            # blocks.{layer}.hook_resid_mid, the MLP's input residual
    stop: str           # the later of the two
    chunk: int          # pairs per vectorised chunk
    n_chunks: int


def init_state(n_pairs: int, d_mlp: int) -> dict:
    """Zeroed sums: both / r_ji / r_ij / err [P], nerr [P, d_mlp], bad []."""
    z = partial(jnp.zeros, dtype=jnp.float32)
    return dict(both=jnp.zeros((n_pairs,), jnp.int32), r_ji=z((n_pairs,)), r_ij=z((n_pairs,)), err=z((n_pairs,)),
                nerr=z((n_pairs, d_mlp)), bad=jnp.zeros((), jnp.int32))


def mlp_post(cfg, up, gate):
    """φ: the MLP's hidden activation from its up (and gate) pre-activations."""
    return activation(cfg, gate) * up if gate is not None else activation(cfg, up)


def _chunk_sums(cfg, w_down, z_up, z_gate, r, scale, chunk):
    """Sums over the batch's tokens for one chunk of pairs. w_down [F, d] (post-norm weight folded in),
    z_* [T, F], r / scale [T]; chunk holds a_i, a_j, both [T, c] and the read-ins ui, uj (gi, gj) [c, F]."""
    a_i, a_j, both, ui, uj, gi, gj = chunk
    si, sj = (a_i * scale[:, None])[..., None], (a_j * scale[:, None])[..., None]     # [T, c, 1]
    ci, cj = si * ui[None], sj * uj[None]                                              # [T, c, F]
    z = jnp.broadcast_to(z_up[:, None], ci.shape)
    zi, zj = z - ci, z - cj
    if z_gate is None:
        e = mlp_post(cfg, z, None) - mlp_post(cfg, zi, None) - mlp_post(cfg, zj, None) + mlp_post(cfg, zi - cj, None)
        touched = (ci != 0) & (cj != 0)
    else:
        q = jnp.broadcast_to(z_gate[:, None], ci.shape)
        hi, hj = si * gi[None], sj * gj[None]
        qi, qj = q - hi, q - hj
        e = mlp_post(cfg, z, q) - mlp_post(cfg, zi, qi) - mlp_post(cfg, zj, qj) + mlp_post(cfg, zi - cj, qi - hj)
        touched = ((ci != 0) | (hi != 0)) & ((cj != 0) | (hj != 0))
    e = jnp.where(touched, e, 0.0)          # exactly 0 where one feature misses m (not float32 rounding)
    wt = both.astype(jnp.float32)                                                      # [T, c]
    out = mm(e, w_down) * r[:, None, None]                                            # [T, c, d]
    ratio = lambda num, den: jnp.where(both, num / jnp.where(both, den, 1.0), 0.0).sum(0)  # noqa: E731
    return dict(both=both.sum(0, dtype=jnp.int32), r_ji=ratio(a_j, a_i), r_ij=ratio(a_i, a_j),
                err=(jnp.linalg.norm(out, axis=-1) * wt).sum(0),
                nerr=jnp.einsum("tcf,tc->cf", jnp.abs(e), wt * r[:, None], precision=jax.lax.Precision.HIGHEST))


def update_state(spec: StreamSpec, state, model, sae, w, feat_i, feat_j, ui, uj, gi, gj, tokens, valid):
    """Fold one batch in (pure). feat_i / feat_j [P] SAE ids; ui, uj, gi, gj [P, F] read-ins (gi, gj
    None for plain MLPs); tokens [b, s]; valid [b, s] bool."""
    cfg = model.config
    out = model.run(tokens, capture=tuple(dict.fromkeys((spec.site, spec.mid))), stop_at=spec.stop, logits=False)
    f, stats = sae.encode_with_stats(out.cache[spec.site])                             # [b, s, d_sae]
    b, s = tokens.shape
    T = b * s
    kappa = decode_scale(sae, stats, (b, s)).reshape(T)
    x = out.cache[spec.mid].reshape(T, -1)
    h = norm(cfg, x, w["ln2_w"], w.get("ln2_b"))
    z_up = mm(h, w["W_up"]) + w.get("b_up", 0.0)
    z_gate = mm(h, w["W_gate"]) if "W_gate" in w else None
    w_down = w["W_down"]
    r = jnp.ones((T,), jnp.float32)
    if cfg.post_norms:          # Gemma-2: the post-feedforward norm, frozen at the token's scale
        r = norm_scale(cfg, mm(mlp_post(cfg, z_up, z_gate), w_down) + w.get("b_down", 0.0))
        w_down = w_down * (cfg.norm_offset + w["ln_mlp_post_w"])
    f = f.reshape(T, -1)
    a_i, a_j = f[:, feat_i], f[:, feat_j]                                              # [T, P]
    both = (a_i > 0) & (a_j > 0) & valid.reshape(T, 1)
    scale = norm_scale(cfg, x) * kappa

    def split(a):                                                                      # [T, P] -> [n, T, c]
        return a.reshape(T, spec.n_chunks, spec.chunk).transpose(1, 0, 2)

    def rows(u):                                                                       # [P, F] -> [n, c, F]
        return None if u is None else u.reshape(spec.n_chunks, spec.chunk, -1)
    sums = jax.lax.map(partial(_chunk_sums, cfg, w_down, z_up, z_gate, r, scale),
                       (split(a_i), split(a_j), split(both), rows(ui), rows(uj), rows(gi), rows(gj)))
    new = {k: state[k] + v.reshape(state[k].shape) for k, v in sums.items()}
    new["bad"] = state["bad"] + jnp.sum(~jnp.isfinite(f) & valid.reshape(T, 1), dtype=jnp.int32)
    return new


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _step(spec, state, model, sae, w, feat_i, feat_j, ui, uj, gi, gj, tokens, valid):
    return update_state(spec, state, model, sae, w, feat_i, feat_j, ui, uj, gi, gj, tokens, valid)


def pair_chunk(n_pairs: int, tokens_per_batch: int, width: int, memory_budget: int) -> int:
    """Pairs per vectorised chunk: about 12 float32 arrays [tokens, chunk, width] live at once."""
    per_pair = 12 * 4 * tokens_per_batch * width
    return int(max(1, min(n_pairs, memory_budget // max(per_pair, 1))))


def stream_pairs(model, sae, layer: int, w: dict, pairs: np.ndarray, read_in: dict, tokens, *, batch_size: int,
                 skip_positions: int, memory_budget: int, progress: bool) -> dict:
    """Host numpy sums over every batch of `tokens` ([n_seq, seq]): STATE_KEYS plus n_tokens.

    `read_in` holds "up" (and "gate") [P, 2, F]: the read-ins of each pair's two features."""
    mid = block_site(layer, "hook_resid_mid")
    P = len(pairs)
    batches = list(token_batches(tokens, batch_size, model.vocab_size))
    seq = batches[0][0].shape[1]
    width = max(model.config.d_mlp, model.config.d_model)
    chunk = pair_chunk(P, batch_size * seq, width, memory_budget)
    n_chunks = -(-P // chunk)
    pad = n_chunks * chunk - P
    spec = StreamSpec(site=sae.site, mid=mid, stop=max(sae.site, mid, key=site_key), chunk=chunk, n_chunks=n_chunks)

    def padded(a):
        return None if a is None else jnp.asarray(np.concatenate([a, np.repeat(a[:1], pad, axis=0)]))
    fi, fj = padded(pairs[:, 0].astype(np.int32)), padded(pairs[:, 1].astype(np.int32))
    up, gate = read_in["up"], read_in.get("gate")
    ui, uj = padded(up[:, 0]), padded(up[:, 1])
    gi, gj = (None, None) if gate is None else (padded(gate[:, 0]), padded(gate[:, 1]))
    live = np.arange(n_chunks * chunk) < P
    state = init_state(n_chunks * chunk, model.config.d_mlp)
    n_tokens = 0
    for toks, rows in progress_iter(batches, desc="neuron interactions", unit="batch", enabled=progress):
        valid = np.zeros(toks.shape, bool)
        valid[:rows, skip_positions:] = True
        n_tokens += int(valid.sum())
        state = _step(spec, state, model, sae, w, fi, fj, ui, uj, gi, gj, jnp.asarray(toks), jnp.asarray(valid))
    out = {k: np.asarray(v) for k, v in jax.device_get(state).items()}
    out = {k: (v if k == "bad" else v[live]) for k, v in out.items()}
    out["n_tokens"] = n_tokens
    return out
