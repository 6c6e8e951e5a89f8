"""Text generation with a key/value cache for built-in models (Llama family, GPT-2, Gemma-2).

The prompt is prefilled by one `model.run` that captures every layer's keys and values
(post-rotary), then each new token runs one jitted decode step: the token's residual
goes through all layers under `lax.scan`, attending to the cache. Shapes are bucketed,
so a step compiles once per (batch, cache length) and never per step.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import JfigError, ShapeError
from .corpus import Corpus, read_jsonl
from ..models.config import ModelConfig
from ..models.forward import unembed
from ..models.layers import activation, apply_rope, norm, rope_tables

TRACE_COUNT = {"step": 0}  # incremented each time the decode step is traced (tests check for retracing)
BUCKET = 32                # cache lengths and prompt widths round up to a multiple of this


def _bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _kv_sites(n_layers: int) -> tuple[str, ...]:
    return tuple(f"blocks.{l}.attn.hook_{kv}" for kv in ("k", "v") for l in range(n_layers))


def _rope_rows(x, cos, sin):
    """Rotate x [b, 1, heads, e] by per-row tables cos, sin [b, e] (each row at its own position)."""
    return jnp.swapaxes(apply_rope(jnp.swapaxes(x, 0, 1), cos, sin), 0, 1)


def _block_step(cfg: ModelConfig, p: dict, x, k_cache, v_cache, pos, cos, sin, sliding):
    """One block for one new token per row. x [b, 1, d]; caches [b, T, g, e]; pos [b]."""
    b = x.shape[0]
    h_in = norm(cfg, x, p["ln1_w"], p.get("ln1_b"))
    q = h_in @ p["W_q"] + (p["b_q"] if cfg.qkv_bias else 0)
    k = h_in @ p["W_k"] + (p["b_k"] if cfg.qkv_bias else 0)
    v = h_in @ p["W_v"] + (p["b_v"] if cfg.qkv_bias else 0)
    q = q.reshape(b, 1, cfg.n_heads, cfg.d_head)
    k = k.reshape(b, 1, cfg.n_kv_heads, cfg.d_head)
    v = v.reshape(b, 1, cfg.n_kv_heads, cfg.d_head)
    if cfg.positional == "rope":
        q, k = _rope_rows(q, cos, sin), _rope_rows(k, cos, sin)
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, pos].set(k[:, 0])
    v_cache = v_cache.at[rows, pos].set(v[:, 0])
    g, T = cfg.n_kv_heads, k_cache.shape[1]
    qg = q[:, 0].reshape(b, g, cfg.n_heads // g, cfg.d_head)
    scores = jnp.einsum("bgre,btge->bgrt", qg, k_cache, preferred_element_type=jnp.float32) * cfg.q_scale
    if cfg.attn_softcap is not None:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    j, i = jnp.arange(T)[None, :], pos[:, None]
    keep = j <= i
    if cfg.sliding_window is not None:
        keep = keep & ((j > i - cfg.sliding_window) | jnp.logical_not(sliding))
    pattern = jax.nn.softmax(jnp.where(keep[:, None, None, :], scores, -jnp.inf), axis=-1)
    z = jnp.einsum("bgrt,btge->bgre", pattern, v_cache).reshape(b, 1, cfg.n_heads * cfg.d_head)
    attn_out = z @ p["W_o"] + (p["b_o"] if cfg.o_bias else 0)
    if cfg.post_norms:
        attn_out = norm(cfg, attn_out, p["ln_attn_post_w"])
    x = x + attn_out
    h_in = norm(cfg, x, p["ln2_w"], p.get("ln2_b"))
    up = h_in @ p["W_up"] + (p["b_up"] if cfg.mlp_bias else 0)
    post = activation(cfg, h_in @ p["W_gate"]) * up if cfg.mlp == "gated" else activation(cfg, up)
    mlp_out = post @ p["W_down"] + (p["b_down"] if cfg.mlp_bias else 0)
    if cfg.post_norms:
        mlp_out = norm(cfg, mlp_out, p["ln_mlp_post_w"])
    return x + mlp_out, k_cache, v_cache


def decode_logits(cfg: ModelConfig, params: dict, k_cache, v_cache, tokens, pos):
    """Logits [b, vocab] for tokens [b] at positions pos [b], given caches [L, b, T, g, e]
    holding every earlier position; returns (logits, k_cache, v_cache) with this token added."""
    x = jnp.take(params["embed"], tokens, axis=0)[:, None] * cfg.embed_scale      # [b, 1, d]
    if cfg.positional == "learned":
        x = x + params["pos_embed"][pos][:, None]
    cos = sin = None
    if cfg.positional == "rope":
        cos, sin = rope_tables(cfg, k_cache.shape[2])
        cos, sin = cos[pos], sin[pos]                                               # [b, e]

    def layer(h, inp):
        p, sliding, kc, vc = inp
        h, kc, vc = _block_step(cfg, p, h, kc, vc, pos, cos, sin, sliding)
        return h, (kc, vc)

    x, (k_cache, v_cache) = jax.lax.scan(layer, x, (params["blocks"], jnp.asarray(cfg.layer_sliding), k_cache, v_cache))
    return unembed(cfg, params, x)[:, 0], k_cache, v_cache


def _pick(logits, key, temperature, greedy, top_k):
    """Next tokens [b] from logits [b, vocab]. greedy (bool) and top_k (int, vocab = off) are
    traced, so one compiled step serves every sampling setting."""
    logits = logits.astype(jnp.float32)
    kth = jnp.sort(logits, axis=-1)[:, ::-1][:, top_k - 1][:, None]
    masked = jnp.where(logits < kth, -jnp.inf, logits / temperature)
    drawn = jax.random.categorical(key, masked, axis=-1)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


@jax.jit
def _pick_first(logits, key, temperature, greedy, top_k):
    return _pick(logits, jax.random.fold_in(key, 0), temperature, greedy, top_k)


@partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1, 2))
def _decode_step(params, k_cache, v_cache, tokens, pos, key, step, temperature, greedy, top_k, *, cfg):
    TRACE_COUNT["step"] += 1
    logits, k_cache, v_cache = decode_logits(cfg, params, k_cache, v_cache, tokens, pos)
    return k_cache, v_cache, _pick(logits, jax.random.fold_in(key, step), temperature, greedy, top_k)


def sample(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 0) -> list[list[int]]:
    """The `max_new_tokens` new tokens after each prompt (ragged prompts are fine).

    temperature=0 is greedy decoding; top_k keeps the k likeliest tokens before sampling.
    Deterministic given `seed`. Needs a built-in model (one with a config).
    """
    cfg = model.config
    if cfg is None:
        raise JfigError("sample needs a built-in model; a Model.from_function model has no layers to cache")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ShapeError("sample needs at least one prompt, each with at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    if temperature < 0 or (top_k is not None and not 1 <= top_k <= cfg.vocab_size):
        raise JfigError(f"temperature must be >= 0 and top_k in [1, {cfg.vocab_size}], got {temperature}, {top_k}")
    lens = np.array([len(p) for p in prompts])
    longest = int(lens.max())
    if cfg.positional == "learned" and longest + max_new_tokens - 1 > cfg.max_seq_len:
        raise ShapeError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"{cfg.max_seq_len} positions")
    width = min(_bucket(longest), cfg.max_seq_len) if cfg.positional == "learned" else _bucket(longest)
    T = _bucket(longest + max_new_tokens)
    padded = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    # Right padding is harmless: position i never attends past itself, and decoding
    # overwrites each padded slot before any query can see it.
    out = model.run(padded, capture=_kv_sites(cfg.n_layers))
    pad = [(0, 0), (0, 0), (0, T - width), (0, 0), (0, 0)]
    k_cache = jnp.pad(jnp.stack([out.cache[f"blocks.{l}.attn.hook_k"] for l in range(cfg.n_layers)]), pad)
    v_cache = jnp.pad(jnp.stack([out.cache[f"blocks.{l}.attn.hook_v"] for l in range(cfg.n_layers)]), pad)
    greedy = jnp.bool_(temperature == 0)
    temp = jnp.float32(temperature or 1.0)
    k = jnp.int32(top_k or cfg.vocab_size)
    key = jax.random.PRNGKey(seed)
    tok = _pick_first(out.logits[jnp.arange(len(prompts)), jnp.asarray(lens - 1)], key, temp, greedy, k)
    pos = jnp.asarray(lens, jnp.int32)
    new = [tok]
    for step in range(1, max_new_tokens):
        k_cache, v_cache, tok = _decode_step(model.params, k_cache, v_cache, tok, pos, key, step, temp,
                                             greedy, k, cfg=cfg)
        pos = pos + 1
        new.append(tok)
    return np.stack([np.asarray(t) for t in new], axis=1).tolist()


# ---------------------------------------------------------------------- sampled text as corpus
def cache_root() -> Path:
    """jfig's cache folder: $XDG_CACHE_HOME/jfig (default ~/.cache/jfig)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jfig"


def _model_fingerprint(model) -> str:
    h = hashlib.sha256(repr(model.config).encode())
    h.update(np.asarray(model.params["embed"][:8], np.float32).tobytes())
    return h.hexdigest()


def sampled_corpus(model, n_docs: int, length: int = 128, seed: int = 0, *, temperature: float = 1.0,
                   top_k: int | None = 50, batch_size: int = 8):
    """A Corpus of `n_docs` texts sampled from `model` (each up to `length` tokens after BOS,
    cut at EOS). Generated on first read and cached as JSONL under
    $XDG_CACHE_HOME/jfig/samples/, keyed by the model and these settings."""
    tok = model.tokenizer
    if tok is None:
        raise JfigError("sampled_corpus needs a model with a tokenizer to decode its samples")
    settings = dict(n_docs=n_docs, length=length, seed=seed, temperature=temperature, top_k=top_k,
                    batch_size=batch_size, model=_model_fingerprint(model))
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (model.config.name or "model"))
    path = cache_root() / "samples" / f"{name}-{key}.jsonl"

    def docs() -> Iterator[str]:
        if not path.exists():
            _write_samples(model, path, n_docs, length, seed, temperature, top_k, batch_size)
        return read_jsonl(path, "text")

    return Corpus(docs, f"{n_docs} samples from {model.config.name or 'model'}")


def _write_samples(model, path: Path, n_docs, length, seed, temperature, top_k, batch_size):
    tok = model.tokenizer
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if start is None:
        raise JfigError("sampled_corpus needs a BOS or EOS token to start generation from")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(0, n_docs, batch_size):
            rows = sample(model, [[start]] * min(batch_size, n_docs - i), length, temperature=temperature,
                          top_k=top_k, seed=seed * 1_000_003 + i)
            for ids in rows:
                if tok.eos_id is not None and tok.eos_id in ids:
                    ids = ids[:ids.index(tok.eos_id)]
                f.write(json.dumps({"text": tok.decode(ids, skip_special=True)}) + "\n")
    os.replace(tmp, path)
