"""The one transformer forward, with hooks at every site, suffix starts and early stops.

`hook(site, x) -> x` is called at every site the caller asked for (`hook.sites`); layers
with no requested site run under `lax.scan` over the stacked parameters, which keeps
compile time flat in depth. Runs can start at a site from given activations (prefix
caching) and stop at a site (no unembedding).
"""
from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from ..sites import (NEEDS_RESID_MID, NEEDS_RESID_PRE, RESIDUAL_STAGES, STAGE, Site,
                     block_site, parse_site)
from .config import ModelConfig
from .layers import activation, apply_rope, attention_pattern, attention_z, norm, rope_tables


class Hook(Protocol):
    sites: frozenset  # the sites this hook wants to see

    def __call__(self, site: str, x: jax.Array) -> jax.Array: ...


class StopRun(Exception):
    """Raised at trace time when the run reaches its stop site; carries nothing."""


def _call(hook: Hook, stop: str | None, site: str, x):
    if site in hook.sites:
        x = hook(site, x)
    if site == stop:
        raise StopRun(site)
    return x


def block(cfg: ModelConfig, p: dict, layer: int, x, cos, sin, sliding, hook: Hook, stop: str | None,
          *, start_stage: int = 0, start_acts=None, freeze: bool = False):
    """One transformer block. x is the residual entering the earliest stage that runs.

    When starting mid-block (`start_stage` > 0), x is the residual the stage needs
    (resid_pre for attn.hook_z / hook_attn_out, resid_mid for mlp sites, ignored for
    residual sites) and `start_acts` the activations at the start site.
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
                pattern = site("attn.hook_pattern", attention_pattern(cfg, q, k, sliding, freeze=freeze))
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
    return site("hook_resid_post", x)


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


def embed(cfg: ModelConfig, params: dict, tokens, hook: Hook, stop: str | None):
    """Token (+ position) embedding -> residual [b, s, d]."""
    x = jnp.take(params["embed"], tokens, axis=0) * cfg.embed_scale
    x = _call(hook, stop, "hook_embed", x)
    if cfg.positional == "learned":
        pos = params["pos_embed"][: tokens.shape[1]][None]
        pos = _call(hook, stop, "hook_pos_embed", jnp.broadcast_to(pos, x.shape))
        x = x + pos
    return x


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
            logits: bool = True, freeze: bool = False, scan: bool = True):
    """Run the model; returns logits [b, s, vocab], the final residual, or None after a stop.

    Either `tokens` [b, s] (a full run) or `start` with `start_acts` (and `start_resid`
    when the start site is not a residual site) for a suffix run. Raises StopRun at `stop`.
    """
    start_site = parse_site(start) if start is not None else None
    if start_site is None:
        x = embed(cfg, params, tokens, hook, stop)
        first_layer, start_stage = 0, 0
        s = tokens.shape[1]
    elif start_site.layer < 0:
        # Suffix from hook_embed / hook_pos_embed: rebuild the residual entering block 0.
        acts = _call(hook, stop, start, start_acts)
        if start == "hook_pos_embed":
            x = start_resid + acts
        elif cfg.positional == "learned":
            pos = _call(hook, stop, "hook_pos_embed", jnp.broadcast_to(params["pos_embed"][: acts.shape[1]][None], acts.shape))
            x = acts + pos
        else:
            x = acts
        first_layer, start_stage, start_acts = 0, 0, None
        s = x.shape[1]
    else:
        first_layer, start_stage = start_site.layer, start_site.stage
        if start_stage in RESIDUAL_STAGES:
            x = start_acts
        elif start_stage in NEEDS_RESID_PRE | NEEDS_RESID_MID:
            x = start_resid
        else:
            raise ValueError(f"a suffix run cannot start at {start!r}")
        s = start_acts.shape[1]
    cos, sin = rope_tables(cfg, s) if cfg.positional == "rope" else (None, None)
    sliding = jnp.asarray(cfg.layer_sliding)
    blocks = params["blocks"]
    hooked = _hooked_layers(hook, stop, start_site)
    stop_layer = parse_site(stop).layer if stop else cfg.n_layers - 1
    l = first_layer
    while l <= min(stop_layer, cfg.n_layers - 1):
        if l in hooked or not scan:
            x = block(cfg, _layer_slice(blocks, l), l, x, cos, sin, sliding[l], hook, stop,
                      start_stage=start_stage if l == first_layer else 0,
                      start_acts=start_acts if l == first_layer else None, freeze=freeze)
            l += 1
            continue
        end = l
        while end + 1 <= stop_layer and end + 1 not in hooked and end + 1 < cfg.n_layers:
            end += 1
        x = _scan_layers(cfg, blocks, l, end + 1, x, cos, sin, sliding, freeze)
        l = end + 1
    if not logits:
        return x
    return unembed(cfg, params, x, freeze=freeze)


def _scan_layers(cfg, blocks, lo: int, hi: int, x, cos, sin, sliding, freeze):
    """Run layers lo..hi-1 (none hooked) with lax.scan; a single layer runs unrolled."""
    if hi - lo == 1:
        return block(cfg, _layer_slice(blocks, lo), lo, x, cos, sin, sliding[lo], _NoHook(), None, freeze=freeze)
    xs = ({k: v[lo:hi] for k, v in blocks.items()}, sliding[lo:hi])

    def step(h, inp):
        p, sl = inp
        return block(cfg, p, 0, h, cos, sin, sl, _NoHook(), None, freeze=freeze), None

    x, _ = jax.lax.scan(step, x, xs)
    return x


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
