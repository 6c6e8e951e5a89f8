"""Pure building blocks of the transformer forward: norms, rotary embedding, attention, MLP.

Shapes: b batch, s sequence, d d_model, h query heads, g kv heads, e d_head, f d_mlp.
`freeze=True` stops gradients through normalisation scales and attention patterns, which
gives the *direct* effect used by attribution graphs (values are unchanged).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .config import ModelConfig


def _frozen(x, freeze: bool):
    return jax.lax.stop_gradient(x) if freeze else x


def norm(cfg: ModelConfig, x, w, b=None, *, freeze: bool = False):
    """RMSNorm (with optional Gemma 1+w offset) or LayerNorm over the last axis. x [..., d]."""
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rms":
        scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        return x32 * _frozen(scale, freeze) * (cfg.norm_offset + w)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    xc = x32 - mu
    scale = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + cfg.norm_eps)
    return xc * _frozen(scale, freeze) * w + b


def activation(cfg: ModelConfig, x):
    if cfg.act == "silu":
        return jax.nn.silu(x)
    if cfg.act == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if cfg.act == "gelu":
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {cfg.act!r}")


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies [d_head/2], with Llama-3 scaling when configured."""
    e = cfg.d_head
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    if cfg.rope_freq_factors is not None:
        inv = inv / jnp.asarray(cfg.rope_freq_factors, jnp.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    wavelen = 2 * math.pi / inv
    lo_w = rs.original_max_position_embeddings / rs.low_freq_factor
    hi_w = rs.original_max_position_embeddings / rs.high_freq_factor
    scaled = jnp.where(wavelen > lo_w, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
    return jnp.where((wavelen >= hi_w) & (wavelen <= lo_w), mid, scaled)


def rope_tables(cfg: ModelConfig, seq: int):
    """cos, sin tables [s, d_head] in HF's rotate-half layout."""
    return rope_at(cfg, jnp.arange(seq))


def rope_at(cfg: ModelConfig, positions):
    """cos, sin tables [..., d_head] at absolute `positions` (int [...], e.g. [b, s])."""
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * rope_inv_freq(cfg)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [b, s, heads, e]; cos, sin [s, e] or per row [b, s, e]; rotate pairs (j, j + e/2)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = (cos, sin) if cos.ndim == 3 else (cos[None], sin[None])
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def causal_keep(cfg: ModelConfig, q_pos, k_pos, sliding):
    """Bool [..., s_q, s_k]: query at absolute position i may see key at j (j <= i, and j > i - window
    on sliding layers). q_pos [s_q] or [b, s_q]; k_pos [s_k] or [b, s_k]."""
    i = q_pos[..., :, None]
    j = k_pos[..., None, :]
    keep = j <= i
    if cfg.sliding_window is not None:
        keep = keep & ((j > i - cfg.sliding_window) | jnp.logical_not(sliding))
    return keep


def attention_pattern(cfg: ModelConfig, q, k, sliding, *, q_pos=None, k_pos=None, freeze: bool = False):
    """Softmax attention pattern [b, h, s_q, s_k] from q [b, s_q, h, e], k [b, s_k, g, e].

    `sliding` is a traced bool: whether this layer uses the sliding window. `q_pos` / `k_pos`
    are the absolute positions of queries and keys ([s] or [b, s]; default 0..s-1); the causal
    and sliding-window masks are computed from them.
    """
    b, sq, h, e = q.shape
    sk, g = k.shape[1], k.shape[2]
    qg = q.reshape(b, sq, g, h // g, e)
    scores = jnp.einsum("bqgre,bkge->bgrqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, h, sq, sk) * cfg.q_scale
    if cfg.attn_softcap is not None:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    q_pos = jnp.arange(sq) if q_pos is None else q_pos
    k_pos = jnp.arange(sk) if k_pos is None else k_pos
    keep = causal_keep(cfg, q_pos, k_pos, sliding)
    keep = keep[:, None] if keep.ndim == 3 else keep
    scores = jnp.where(keep, scores, -jnp.inf)
    return _frozen(jax.nn.softmax(scores, axis=-1), freeze)


def attention_z(pattern, v):
    """z [b, s_q, h, e] from pattern [b, h, s_q, s_k] and v [b, s_k, g, e] (GQA: head h reads kv h // (h/g))."""
    b, h, sq, sk = pattern.shape
    g = v.shape[2]
    pg = pattern.reshape(b, g, h // g, sq, sk)
    z = jnp.einsum("bgrqk,bkge->bqgre", pg, v)
    return z.reshape(b, sq, h, v.shape[-1])
