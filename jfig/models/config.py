"""ModelConfig: one frozen dataclass that covers GPT-2, the Llama family and Gemma-2.

Architecture differences live here as data (norm kind, MLP kind, positional scheme,
soft-caps, sliding windows), so the forward pass has no per-family branches beyond
reading these fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

FAMILIES = ("llama", "gpt2", "gemma2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (HF rope_type 'llama3')."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer. Hashable: used as a jit static arg."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    max_seq_len: int = 2048
    norm: str = "rms"                 # "rms" | "layer"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0          # Gemma: scale = 1 + w
    mlp: str = "gated"                # "gated": down(act(gate x) * up x) | "plain": down(act(up x))
    act: str = "silu"                 # "silu" | "gelu_tanh" | "gelu"
    positional: str = "rope"          # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF rope_freqs: per-frequency divisors
    attn_scale: float | None = None   # multiplier on q·k; None -> 1/sqrt(d_head)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()   # per layer: does it use the sliding window?
    embed_scale: float = 1.0          # Gemma: sqrt(d_model)
    post_norms: bool = False          # Gemma-2: norms after attention and after the MLP
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tied_embeddings: bool = False
    name: str = ""
    extra: tuple = field(default=(), compare=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")

    @property
    def q_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.d_head)

    @property
    def layer_sliding(self) -> tuple[bool, ...]:
        return self.sliding_layers or (False,) * self.n_layers

    def replace(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


def llama_config(**kw) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


def gpt2_config(**kw) -> ModelConfig:
    base = dict(norm="layer", mlp="plain", act="gelu_tanh", positional="learned",
                qkv_bias=True, o_bias=True, mlp_bias=True, tied_embeddings=True)
    base.update(kw)
    return ModelConfig(family="gpt2", **base)


def gemma2_config(*, n_layers: int, d_model: int, query_pre_attn_scalar: float | None = None,
                  sliding_window: int | None = 4096, **kw) -> ModelConfig:
    """Gemma-2: even layers (0, 2, ...) use the sliding window, odd layers are global."""
    d_head = kw["d_head"]
    base = dict(norm_offset=1.0, act="gelu_tanh", post_norms=True, tied_embeddings=True,
                embed_scale=math.sqrt(d_model), norm_eps=1e-6,
                attn_scale=(query_pre_attn_scalar or d_head) ** -0.5,
                attn_softcap=50.0, final_softcap=30.0, sliding_window=sliding_window,
                sliding_layers=tuple(l % 2 == 0 for l in range(n_layers)) if sliding_window else ())
    base.update(kw)
    return ModelConfig(family="gemma2", n_layers=n_layers, d_model=d_model, **base)
