"""The one transformer forward, with hooks at every site, suffix starts, early stops and a KV cache.

`hook(site, x) -> x` is called at every site the caller asked for (`hook.sites`); layers
with no requested site run under `lax.scan` over the stacked parameters, which keeps
compile time flat in depth. Runs can start at a site from given activations (prefix
caching) and stop at a site (no unembedding). Given a `KVCache` and absolute `positions`,
a run computes only those positions, attending to the cached keys/values of earlier
positions, and returns the cache with its own keys/values written in (generation,
position-sparse suffixes).
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from ..sites import (NEEDS_RESID_MID, NEEDS_RESID_PRE, RESIDUAL_STAGES, STAGE, Site,
                     block_site, parse_site)
from .config import ModelConfig
from .layers import activation, apply_rope, attention_pattern, attention_z, norm, rope_at, rope_tables


class Hook(Protocol):
    sites: frozenset  # the sites this hook wants to see

    def __call__(self, site: str, x: jax.Array) -> jax.Array: ...


class KVCache(NamedTuple):
    """Keys (post-rotary) and values of every layer, indexed by absolute position (the slot).

    k, v: [n_layers, batch, T, n_kv_heads, d_head]. Slot j holds position j's key/value; a
    query at position i reads slots j <= i (within the window on sliding layers), so those
    must be filled before it runs.
    """

    k: jax.Array
    v: jax.Array


def empty_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """A zero KVCache with `length` slots per row."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.d_head)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class StopRun(Exception):
    """Raised at trace time when the run reaches its stop site; carries nothing."""


def _call(hook: Hook, stop: str | None, site: str, x):
    if site in hook.sites:
        x = hook(site, x)
    if site == stop:
        raise StopRun(site)
    return x


def block(cfg: ModelConfig, p: dict, layer: int, x, cos, sin, sliding, hook: Hook, stop: str | None,
          *, start_stage: int = 0, start_acts=None, freeze: bool = False, positions=None, kv=None):
    """One transformer block. x [b, s, d] is the residual entering the earliest stage that runs.

    When starting mid-block (`start_stage` > 0), x is the residual the stage needs
    (resid_pre for attn.hook_z / hook_attn_out, resid_mid for mlp sites, ignored for
    residual sites) and `start_acts` the activations at the start site. `positions`
    [b|1, s] are the absolute positions of x's rows (default 0..s-1; cos/sin must match).
    With `kv` = this layer's (k, v) cache [b, T, g, e], the chunk's keys/values are written
    at slots `positions`, queries attend over all T slots, and (x, kv) is returned.
    """
    S = lambda local: block_site(layer, local)  # noqa: E731
    st = start_stage

    def site(local, value):
        if STAGE[local] == st and start_acts is not None:
            value = start_acts
        return _call(hook, stop, S(local), value)

    if st <= STAGE["hook_attn_out"]:
        if st <= STAGE["hook_resid_pre"]:
            x = site("hook_resid_pre", x)
        resid_pre = x
        if st <= STAGE["attn.hook_z"]:
            if st < STAGE["attn.hook_z"]:
                b, s, _ = x.shape
                h_in = norm(cfg, x, p["ln1_w"], p.get("ln1_b"), freeze=freeze)
                q = h_in @ p["W_q"] + (p["b_q"] if cfg.qkv_bias else 0)
                k = h_in @ p["W_k"] + (p["b_k"] if cfg.qkv_bias else 0)
                v = h_in @ p["W_v"] + (p["b_v"] if cfg.qkv_bias else 0)
                q = q.reshape(b, s, cfg.n_heads, cfg.d_head)
                k = k.reshape(b, s, cfg.n_kv_heads, cfg.d_head)
                v = v.reshape(b, s, cfg.n_kv_heads, cfg.d_head)
                if cfg.positional == "rope":
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                q = site("attn.hook_q", q)
                k = site("attn.hook_k", k)
                v = site("attn.hook_v", v)
                if kv is not None:
                    kv = _write_kv(kv, k, v, positions)
                    k, v = kv
                    k_pos = jnp.arange(k.shape[1])
                else:
                    k_pos = positions
                pattern = site("attn.hook_pattern", attention_pattern(cfg, q, k, sliding, q_pos=positions,
                                                                      k_pos=k_pos, freeze=freeze))
                z = attention_z(pattern, v)
            else:
                z = None
            z = site("attn.hook_z", z)
            b, s = z.shape[:2]
            attn_out = z.reshape(b, s, cfg.n_heads * cfg.d_head) @ p["W_o"] + (p["b_o"] if cfg.o_bias else 0)
            if cfg.post_norms:
                attn_out = norm(cfg, attn_out, p["ln_attn_post_w"], freeze=freeze)
        else:
            attn_out = None
        attn_out = site("hook_attn_out", attn_out)
        x = resid_pre + attn_out
    if st <= STAGE["hook_mlp_out"]:
        if st <= STAGE["hook_resid_mid"]:
            x = site("hook_resid_mid", x)
        resid_mid = x
        if st <= STAGE["mlp.hook_post"]:
            if st < STAGE["mlp.hook_post"]:
                h_in = norm(cfg, x, p["ln2_w"], p.get("ln2_b"), freeze=freeze)
                up = h_in @ p["W_up"] + (p["b_up"] if cfg.mlp_bias else 0)
                post = activation(cfg, h_in @ p["W_gate"]) * up if cfg.mlp == "gated" else activation(cfg, up)
            else:
                post = None
            post = site("mlp.hook_post", post)
            mlp_out = post @ p["W_down"] + (p["b_down"] if cfg.mlp_bias else 0)
            if cfg.post_norms:
                mlp_out = norm(cfg, mlp_out, p["ln_mlp_post_w"], freeze=freeze)
        else:
            mlp_out = None
        mlp_out = site("hook_mlp_out", mlp_out)
        x = resid_mid + mlp_out
    x = site("hook_resid_post", x)
    return x if kv is None else (x, kv)


def _write_kv(kv, k, v, positions):
    """Write k, v [b, s, g, e] into the layer cache kv = (k, v) [b, T, g, e] at slots `positions` [b|1, s]."""
    kc, vc = kv
    b, s = k.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(s)[None] if positions is None else positions, (b, s))
    rows = jnp.arange(b)[:, None]
    return kc.at[rows, slots].set(k.astype(kc.dtype)), vc.at[rows, slots].set(v.astype(vc.dtype))


class _NoHook:
    sites = frozenset()

    def __call__(self, site, x):
        return x


def _layer_slice(blocks: dict, l: int) -> dict:
    return {k: v[l] for k, v in blocks.items()}


def _hooked_layers(hook: Hook, stop: str | None, start: Site | None) -> set[int]:
    names = set(hook.sites) | ({stop} if stop else set())
    layers = {parse_site(n).layer for n in names}
    if start is not None:
        layers.add(start.layer)
    return layers


def embed(cfg: ModelConfig, params: dict, tokens, hook: Hook, stop: str | None, positions=None):
    """Token (+ position) embedding -> residual [b, s, d]; `positions` [b|1, s] default 0..s-1."""
    x = jnp.take(params["embed"], tokens, axis=0) * cfg.embed_scale
    x = _call(hook, stop, "hook_embed", x)
    if cfg.positional == "learned":
        x = x + _call(hook, stop, "hook_pos_embed", _pos_embed(params, positions, x.shape))
    return x


def _pos_embed(params: dict, positions, shape):
    """Learned position embeddings broadcast to `shape` [b, s, d]."""
    rows = params["pos_embed"][: shape[1]][None] if positions is None else params["pos_embed"][positions]
    return jnp.broadcast_to(rows, shape)


def unembed(cfg: ModelConfig, params: dict, x, *, freeze: bool = False):
    """Final norm and unembedding: logits [b, s, vocab], soft-capped when configured."""
    h = norm(cfg, x, params["ln_f_w"], params.get("ln_f_b"), freeze=freeze)
    w = params["unembed"] if "unembed" in params else params["embed"].T
    logits = h @ w
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def forward(cfg: ModelConfig, params: dict, *, tokens=None, hook: Hook = _NoHook(), stop: str | None = None,
            start: str | None = None, start_acts=None, start_resid=None, seq_len: int | None = None,
            logits: bool = True, freeze: bool = False, scan: bool = True, positions=None,
            cache: KVCache | None = None):
    """Run the model; returns logits [b, s, vocab], the final residual, or None after a stop.

    Either `tokens` [b, s] (a full run) or `start` with `start_acts` (and `start_resid`
    when the start site is not a residual site) for a suffix run. Raises StopRun at `stop`.
    `positions` (int [s] or [b, s]) are the absolute positions of the s positions run
    (rotary / learned embeddings and masks use them; default 0..s-1). With `cache`, keys
    and values of these positions are written into it at slots `positions`, attention reads
    every slot (earlier positions must be filled), and the result is (output, new cache);
    layers before a mid-model `start` keep their cached entries.
    """
    start_site = parse_site(start) if start is not None else None
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
        positions = positions[None] if positions.ndim == 1 else positions
    if start_site is None:
        x = embed(cfg, params, tokens, hook, stop, positions)
        first_layer, start_stage = 0, 0
    elif start_site.layer < 0:
        # Suffix from hook_embed / hook_pos_embed: rebuild the residual entering block 0.
        acts = _call(hook, stop, start, start_acts)
        if start == "hook_pos_embed":
            x = start_resid + acts
        elif cfg.positional == "learned":
            x = acts + _call(hook, stop, "hook_pos_embed", _pos_embed(params, positions, acts.shape))
        else:
            x = acts
        first_layer, start_stage, start_acts = 0, 0, None
    else:
        first_layer, start_stage = start_site.layer, start_site.stage
        if start_stage in RESIDUAL_STAGES:
            x = start_acts
        elif start_stage in NEEDS_RESID_PRE | NEEDS_RESID_MID:
            x = start_resid
        else:
            raise ValueError(f"a suffix run cannot start at {start!r}")
    s = x.shape[1]
    if cfg.positional != "rope":
        cos = sin = None
    else:
        cos, sin = rope_tables(cfg, s) if positions is None else rope_at(cfg, positions)
    sliding = jnp.asarray(cfg.layer_sliding)
    blocks = params["blocks"]
    hooked = _hooked_layers(hook, stop, start_site)
    stop_layer = parse_site(stop).layer if stop else cfg.n_layers - 1
    kv_parts = [] if cache is None or first_layer == 0 else [(cache.k[:first_layer], cache.v[:first_layer])]
    l = first_layer
    while l <= min(stop_layer, cfg.n_layers - 1):
        if l in hooked or not scan:
            kv = None if cache is None else (cache.k[l], cache.v[l])
            x = block(cfg, _layer_slice(blocks, l), l, x, cos, sin, sliding[l], hook, stop,
                      start_stage=start_stage if l == first_layer else 0,
                      start_acts=start_acts if l == first_layer else None, freeze=freeze,
                      positions=positions, kv=kv)
            if cache is not None:
                x, (k, v) = x
                kv_parts.append((k[None], v[None]))
            l += 1
            continue
        end = l
        while end + 1 <= stop_layer and end + 1 not in hooked and end + 1 < cfg.n_layers:
            end += 1
        x = _scan_layers(cfg, blocks, l, end + 1, x, cos, sin, sliding, freeze, positions, cache)
        if cache is not None:
            x, kv = x
            kv_parts.append(kv)
        l = end + 1
    out = unembed(cfg, params, x, freeze=freeze) if logits else x
    if cache is None:
        return out
    if len(kv_parts) == 1:
        return out, KVCache(*kv_parts[0])
    return out, KVCache(jnp.concatenate([k for k, _ in kv_parts]), jnp.concatenate([v for _, v in kv_parts]))


def _scan_layers(cfg, blocks, lo: int, hi: int, x, cos, sin, sliding, freeze, positions=None, cache=None):
    """Run layers lo..hi-1 (none hooked) with lax.scan; a single layer runs unrolled.

    With a cache, also scans its layers lo..hi-1 and returns (x, (k, v) [hi-lo, b, T, g, e]).
    """
    if hi - lo == 1:
        kv = None if cache is None else (cache.k[lo], cache.v[lo])
        out = block(cfg, _layer_slice(blocks, lo), lo, x, cos, sin, sliding[lo], _NoHook(), None,
                    freeze=freeze, positions=positions, kv=kv)
        return out if cache is None else (out[0], (out[1][0][None], out[1][1][None]))
    params = {k: v[lo:hi] for k, v in blocks.items()}
    if cache is None:
        def step(h, inp):
            p, sl = inp
            return block(cfg, p, 0, h, cos, sin, sl, _NoHook(), None, freeze=freeze, positions=positions), None

        x, _ = jax.lax.scan(step, x, (params, sliding[lo:hi]))
        return x

    def cached_step(h, inp):
        p, sl, kc, vc = inp
        return block(cfg, p, 0, h, cos, sin, sl, _NoHook(), None, freeze=freeze, positions=positions, kv=(kc, vc))

    return jax.lax.scan(cached_step, x, (params, sliding[lo:hi], cache.k[lo:hi], cache.v[lo:hi]))


def init_params(cfg: ModelConfig, key, scale: float = 0.02) -> dict:
    """Random parameters in jfig's layout (for tests and synthetic models)."""
    d, f, L = cfg.d_model, cfg.d_mlp, cfg.n_layers
    hq, hk = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    shapes = {"ln1_w": (L, d), "W_q": (L, d, hq), "W_k": (L, d, hk), "W_v": (L, d, hk), "W_o": (L, hq, d),
              "ln2_w": (L, d), "W_up": (L, d, f), "W_down": (L, f, d)}
    if cfg.mlp == "gated":
        shapes["W_gate"] = (L, d, f)
    if cfg.norm == "layer":
        shapes.update(ln1_b=(L, d), ln2_b=(L, d))
    if cfg.qkv_bias:
        shapes.update(b_q=(L, hq), b_k=(L, hk), b_v=(L, hk))
    if cfg.o_bias:
        shapes["b_o"] = (L, d)
    if cfg.mlp_bias:
        shapes.update(b_up=(L, f), b_down=(L, d))
    if cfg.post_norms:
        shapes.update(ln_attn_post_w=(L, d), ln_mlp_post_w=(L, d))
    keys = iter(jax.random.split(key, len(shapes) + 4))
    blocks = {}
    for name, shp in sorted(shapes.items()):
        r = jax.random.normal(next(keys), shp) * scale
        blocks[name] = (1.0 + r if cfg.norm_offset == 0 else r) if name.startswith("ln") and name.endswith("_w") else r
    params = {"embed": jax.random.normal(next(keys), (cfg.vocab_size, d)), "blocks": blocks,
              "ln_f_w": (1.0 if cfg.norm_offset == 0 else 0.0) + jax.random.normal(next(keys), (d,)) * scale}
    if cfg.norm == "layer":
        params["ln_f_b"] = jnp.zeros(d)
    if cfg.positional == "learned":
        params["pos_embed"] = jax.random.normal(next(keys), (cfg.max_seq_len, d)) * scale
    if not cfg.tied_embeddings:
        params["unembed"] = jax.random.normal(next(keys), (d, cfg.vocab_size)) * scale
    return params
