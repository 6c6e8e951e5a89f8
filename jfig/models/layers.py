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
    freqs = jnp.arange(seq, dtype=jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [b, s, heads, e]; rotate pairs (j, j + e/2)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def attention_pattern(cfg: ModelConfig, q, k, sliding, *, freeze: bool = False):
    """Softmax attention pattern [b, h, s_q, s_k] from q [b, s, h, e], k [b, s, g, e].

    `sliding` is a traced bool: whether this layer uses the sliding window.
    """
    b, s, h, e = q.shape
    g = k.shape[2]
    qg = q.reshape(b, s, g, h // g, e)
    scores = jnp.einsum("bqgre,bkge->bgrqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, h, s, s) * cfg.q_scale
    if cfg.attn_softcap is not None:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    i = jnp.arange(s)[:, None]
    j = jnp.arange(s)[None, :]
    keep = j <= i
    if cfg.sliding_window is not None:
        keep = keep & ((j > i - cfg.sliding_window) | jnp.logical_not(sliding))
    scores = jnp.where(keep, scores, -jnp.inf)
    return _frozen(jax.nn.softmax(scores, axis=-1), freeze)


def attention_z(pattern, v):
    """z [b, s, h, e] from pattern [b, h, s_q, s_k] and v [b, s, g, e] (GQA: head h reads kv h // (h/g))."""
    b, h, s, _ = pattern.shape
    g = v.shape[2]
    pg = pattern.reshape(b, g, h // g, s, s)
    z = jnp.einsum("bgrqk,bkge->bqgre", pg, v)
    return z.reshape(b, s, h, v.shape[-1])
