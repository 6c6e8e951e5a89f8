"""Generation through the one forward with a key/value cache, edits applied at every step.

The prompts (right-padded into one bucketed width, each row at its own positions 0..n-1)
are prefilled by one cached `forward` pass; then each new token runs one jitted cached
`forward` of a single position per row, at that row's next absolute position. Cache
lengths and prompt widths are rounded up to multiples of BUCKET, so the step compiles
once per (batch, cache length) and never per step; sampling settings are traced values.

Edits apply wherever their site runs: to every prompt position during prefill and to each
new token during decoding. An edit's `positions` are absolute positions of the row's
sequence (prompt and generated tokens together): int indices edit exactly those positions,
whether they fall in the prompt or among the new tokens; a bool mask [seq] / [batch, seq]
edits where it is True and leaves positions past its length unedited; None edits every
position, new tokens included (steered generation).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Patch, flatten_edits, position_axis
from ..errors import JfigError, ShapeError
from ..sites import parse_site
from .config import ModelConfig
from .forward import KVCache, empty_cache, forward, unembed
from .hooks import EditHook

BUCKET = 32   # cache lengths and prompt widths round up to a multiple of this
FILL = -1     # fills the front of shorter prompts' rows in a ragged batch's output


class Generation(NamedTuple):
    tokens: np.ndarray               # [batch, longest prompt + new], each row's prompt then its new tokens
    logits: np.ndarray | None        # [batch, new, vocab]: the logits each new token was picked from


def bucket(n: int) -> int:
    """n rounded up to a multiple of BUCKET."""
    return -(-n // BUCKET) * BUCKET


def run_positions(cfg: ModelConfig, params: dict, tokens, positions, cache: KVCache, edits=(), *, logits=True):
    """Run tokens [b, s] at absolute positions [b, s] against `cache` (which must hold every
    earlier position a query can see); returns (logits [b, s, vocab] or the final residual, cache
    with these positions written). Edits apply at these positions, read as absolute positions."""
    hook = EditHook(tuple(edits), (), None, positions=positions)
    return forward(cfg, params, tokens=tokens, hook=hook, positions=positions, cache=cache, logits=logits)


def _pick(logits, key, temperature, greedy, top_k):
    """Next tokens [b] from logits [b, vocab]. greedy (bool) and top_k (int, vocab = off) are
    traced, so one compiled step serves every sampling setting."""
    logits = logits.astype(jnp.float32)
    kth = jnp.sort(logits, axis=-1)[:, ::-1][:, top_k - 1][:, None]
    masked = jnp.where(logits < kth, -jnp.inf, logits / temperature)
    drawn = jax.random.categorical(key, masked, axis=-1)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "length"))
def _prefill(params, tokens, lens, edits, key, temperature, greedy, top_k, *, cfg, length):
    """Cache [.., length, ..] of the prompts tokens [b, w], the first new token [b] and its logits."""
    b, w = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    x, cache = run_positions(cfg, params, tokens, positions, empty_cache(cfg, b, length), edits, logits=False)
    last = unembed(cfg, params, x[jnp.arange(b), lens - 1][:, None])[:, 0]
    return cache, _pick(last, jax.random.fold_in(key, 0), temperature, greedy, top_k), last


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_step(params, cache, tokens, pos, edits, key, step, temperature, greedy, top_k, *, cfg):
    """One new token per row: tokens [b] at positions pos [b] -> (cache, next tokens [b], logits [b, vocab])."""
    logits, cache = run_positions(cfg, params, tokens[:, None], pos[:, None], cache, edits)
    logits = logits[:, 0]
    return cache, _pick(logits, jax.random.fold_in(key, step), temperature, greedy, top_k), logits


def generate(model, prompts, max_new_tokens: int, *, edits=(), temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0, return_logits: bool = False) -> Generation:
    """Continue `prompts` (int array [batch, seq] / [seq], or a list of token lists of any
    lengths) by `max_new_tokens` tokens, applying `edits` at every step.

    temperature=0 is greedy; top_k keeps the k likeliest tokens before sampling; deterministic
    given `seed`. Rows of a ragged batch are right-aligned in `tokens`, shorter prompts preceded
    by FILL (-1), so `tokens[:, -max_new_tokens:]` are always the new tokens.
    """
    cfg = model.config
    if cfg is None:
        raise JfigError("generate needs a built-in model (one with a ModelConfig): a Model.from_function model "
                        "is an opaque function that jfig cannot run position by position on a key/value cache; "
                        "re-run model.run on the whole sequence for each new token instead")
    rows = _prompt_rows(prompts, cfg)
    flat = _check_edits(model, edits)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise JfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0 or (top_k is not None and not 1 <= top_k <= cfg.vocab_size):
        raise JfigError(f"temperature must be >= 0 and top_k in [1, {cfg.vocab_size}], got {temperature}, {top_k}")
    lens = np.array([len(r) for r in rows])
    longest = int(lens.max())
    if cfg.positional == "learned" and longest + max(max_new_tokens - 1, 0) > cfg.max_seq_len:
        raise ShapeError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"{cfg.max_seq_len} positions")
    if max_new_tokens == 0:
        return Generation(_assemble(rows, np.zeros((len(rows), 0), np.int32)), None)
    width = min(bucket(longest), cfg.max_seq_len) if cfg.positional == "learned" else bucket(longest)
    padded = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    # Right padding is harmless: a query never reads a slot past its own position, and each
    # decode step writes its slot before reading it, overwriting what padding left there.
    greedy, temp = jnp.bool_(temperature == 0), jnp.float32(temperature or 1.0)
    k, key = jnp.int32(top_k or cfg.vocab_size), jax.random.PRNGKey(seed)
    cache, tok, logits = _prefill(model.params, jnp.asarray(padded), jnp.asarray(lens, jnp.int32), flat, key, temp,
                                  greedy, k, cfg=cfg, length=bucket(longest + max_new_tokens))
    pos = jnp.asarray(lens, jnp.int32)
    new, steps = [tok], [logits]
    for step in range(1, max_new_tokens):
        cache, tok, logits = _decode_step(model.params, cache, tok, pos, flat, key, step, temp, greedy, k, cfg=cfg)
        pos = pos + 1
        new.append(tok)
        if return_logits:
            steps.append(logits)
    new_np = np.stack([np.asarray(t) for t in new], axis=1)
    return Generation(_assemble(rows, new_np), np.stack([np.asarray(s) for s in steps], 1) if return_logits else None)


def _prompt_rows(prompts, cfg: ModelConfig) -> list[list[int]]:
    """Prompts as lists of ints, checked: at least one, none empty, ids inside the vocabulary."""
    if hasattr(prompts, "ndim"):
        arr = np.asarray(prompts)
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
            raise ShapeError(f"prompts must be an int array [batch, seq] or [seq], got {arr.dtype} {arr.shape}")
        rows = (arr[None] if arr.ndim == 1 else arr).tolist()
    else:
        rows = [[int(t) for t in p] for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ShapeError("generation needs at least one prompt, each with at least one token (e.g. BOS)")
    bad = [t for r in rows for t in r if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ShapeError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    return rows


def _check_edits(model, edits) -> tuple:
    """Flat edits whose sites exist and that make sense position by position."""
    flat = flatten_edits(edits)
    for e in flat:
        model.check_site(e.site)
        if position_axis(e.site) != 1:
            raise JfigError(f"edits at {e.site!r} cannot apply during generation: a cached step's attention "
                            f"pattern spans the cache's slots, not the sequence")
        rank = 4 if parse_site(e.site).local in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z") else 3
        if isinstance(e, Patch) and e.values.ndim >= rank - 1 and e.values.shape[1 - rank] != 1:
            raise JfigError(f"Patch at {e.site!r} has values of shape {tuple(e.values.shape)} with a position axis; "
                            f"generation needs values that broadcast to one position ([d] or [batch, 1, d])")
    return flat


def _assemble(rows: list[list[int]], new: np.ndarray) -> np.ndarray:
    """[batch, longest + new]: each row's prompt right-aligned before its new tokens, FILL in front."""
    longest = max(len(r) for r in rows)
    out = np.full((len(rows), longest + new.shape[1]), FILL, np.int32)
    for i, r in enumerate(rows):
        out[i, longest - len(r):longest] = r
    out[:, longest:] = new
    return out
