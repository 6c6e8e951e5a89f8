"""Tiny random models of each family, for researchers' tests (no hypothesis needed).

A tiny model is a real jfig transformer (`Model.from_config`): the same forward, hooks, edits and
prefix caching as a full-size model, at a size where a forward pass compiles in about a second on a
CPU and runs in microseconds. The configuration is data (`ModelConfig`), and jit caches compiled code
by configuration and token shape, so models that share a configuration but differ in their random
weights reuse one compilation.
"""
from __future__ import annotations

import jax

from ..models.config import FAMILIES, ModelConfig, gemma2_config, gpt2_config, llama_config
from ..models.forward import init_params
from ..models.model import Model

TINY_VOCAB = 64
TINY_MAX_SEQ = 32
CONFIG_MAKERS = {"llama": llama_config, "gpt2": gpt2_config, "gemma2": gemma2_config}


def tiny_config(family: str = "llama", *, n_layers: int = 2, d_model: int = 16, vocab_size: int = TINY_VOCAB,
                max_seq_len: int = TINY_MAX_SEQ, **overrides) -> ModelConfig:
    """A tiny `ModelConfig` of `family` ("llama", "gpt2" or "gemma2").

    Heads of width 4 (d_model / 4 of them), grouped-query attention with half as many key/value heads
    for Llama and Gemma-2, an MLP twice as wide as the residual stream, a sliding window of 3 tokens on
    Gemma-2's even layers (so it matters on short sequences). `overrides` sets any other field.
    """
    if family not in CONFIG_MAKERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of 4 (heads of width 4), got {d_model}")
    n_heads = d_model // 4
    base = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=max(1, n_heads // 2), d_head=4,
                d_mlp=2 * d_model, vocab_size=vocab_size, max_seq_len=max_seq_len)
    if family == "gpt2":
        base["n_kv_heads"] = n_heads
    if family == "gemma2":
        base["sliding_window"] = 3
    base.update(overrides)
    return CONFIG_MAKERS[family](**base)


def tiny_model(family: str = "llama", *, seed: int = 0, scale: float = 0.2, **config) -> Model:
    """A tiny random `Model` of `family`: weights drawn from `seed` (normal, standard deviation
    `scale`), the configuration from `tiny_config(family, **config)`. The same arguments give the
    same model."""
    cfg = tiny_config(family, **config)
    return Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(seed), scale=scale))
