"""GGUF file -> ModelConfig + params (+ tokenizer), for the Llama family, Gemma-2 and GPT-2.

llama.cpp's converter permutes Q/K rows of Llama-family models into Meta's interleaved
RoPE layout; we undo it so q/k sites match HF/TransformerLens. Gemma-2 GGUF norms are
stored as 1 + w; we subtract 1 to keep HF's convention. GGUF 2-D tensors come out of the
reader as (out, in) and are transposed to jfig's (in, out).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import FormatError
from .config import ModelConfig, gemma2_config, gpt2_config, llama_config
from .gguf_reader import GGUFContents, read_gguf
from .hf_loader import check_param_shapes, stack_layers
from .tokenizer import Tokenizer

LLAMA_ARCHS = ("llama", "mistral", "smollm")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: rows (out) of w [n_heads*hd, ...] back to HF order."""
    hd = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF -> GGUF row order); the inverse of `unpermute_qk`."""
    hd = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(g: GGUFContents) -> ModelConfig:
    arch = g.require("general.architecture")
    if arch not in ("gpt2", "gemma2") + LLAMA_ARCHS:  # before reading keys other architectures lack
        raise FormatError(f"{g.path}: general.architecture {arch!r} is not supported; "
                          f"expected one of gpt2, gemma2, {', '.join(LLAMA_ARCHS)}")
    a = lambda k, default=None: g.metadata.get(f"{arch}.{k}", default)  # noqa: E731
    req = lambda k: g.require(f"{arch}.{k}")  # noqa: E731
    d, h, L = int(req("embedding_length")), int(req("attention.head_count")), int(req("block_count"))
    vocab = a("vocab_size") or g.tensor_info("token_embd.weight").shape[0]
    name = g.metadata.get("general.name", arch)
    if arch == "gpt2":
        return gpt2_config(n_layers=L, d_model=d, n_heads=h, n_kv_heads=h, d_head=d // h,
                           d_mlp=int(req("feed_forward_length")), vocab_size=int(vocab),
                           max_seq_len=int(req("context_length")),
                           norm_eps=float(a("attention.layer_norm_epsilon", 1e-5)),
                           tied_embeddings="output.weight" not in g.tensor_names, name=name)
    kv = int(a("attention.head_count_kv", h))
    d_head = int(a("attention.key_length") or a("rope.dimension_count") or d // h)
    common = dict(n_layers=L, d_model=d, n_heads=h, n_kv_heads=kv, d_head=d_head,
                  d_mlp=int(req("feed_forward_length")), vocab_size=int(vocab),
                  max_seq_len=int(a("context_length", 8192)), rope_theta=float(a("rope.freq_base", 10000.0)),
                  name=name)
    if arch == "gemma2":
        # query_pre_attn_scalar is not stored; llama.cpp uses d_model/n_heads for the 46-layer 27B.
        qpas = d / h if L == 46 else d_head
        win = a("attention.sliding_window")
        return gemma2_config(**common, query_pre_attn_scalar=qpas, sliding_window=int(win) if win else None,
                             norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
                             attn_softcap=_opt_float(a("attn_logit_softcapping")),
                             final_softcap=_opt_float(a("final_logit_softcapping")))
    factors = None  # the Llama family
    if "rope_freqs.weight" in g.tensor_names:
        factors = tuple(float(x) for x in g.tensor("rope_freqs.weight"))
    return llama_config(**common, norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
                        rope_freq_factors=factors, qkv_bias="blk.0.attn_q.bias" in g.tensor_names,
                        tied_embeddings="output.weight" not in g.tensor_names)


def _opt_float(x):
    return float(x) if x is not None else None


def params_from_gguf(cfg: ModelConfig, g: GGUFContents) -> dict[str, Any]:
    t = g.tensor
    has = lambda n: n in g.tensor_names  # noqa: E731

    def need(name):
        if not has(name):
            raise FormatError(f"{g.path}: tensor {name!r} is missing (needed for a {cfg.family} model)")
        return t(name)

    norm_shift = 1.0 if cfg.family == "gemma2" else 0.0
    layers = []
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        p = {"ln1_w": need(b + "attn_norm.weight") - norm_shift, "ln2_w": need(b + "ffn_norm.weight") - norm_shift,
             "W_o": need(b + "attn_output.weight").T, "W_up": need(b + "ffn_up.weight").T,
             "W_down": need(b + "ffn_down.weight").T}
        if cfg.family == "gpt2":
            qkv, qkv_b = need(b + "attn_qkv.weight").T, need(b + "attn_qkv.bias")
            d = cfg.d_model
            p.update(W_q=qkv[:, :d], W_k=qkv[:, d:2 * d], W_v=qkv[:, 2 * d:], b_q=qkv_b[:d], b_k=qkv_b[d:2 * d],
                     b_v=qkv_b[2 * d:], ln1_b=need(b + "attn_norm.bias"), ln2_b=need(b + "ffn_norm.bias"),
                     b_o=need(b + "attn_output.bias"), b_up=need(b + "ffn_up.bias"), b_down=need(b + "ffn_down.bias"))
        else:
            q, k = need(b + "attn_q.weight"), need(b + "attn_k.weight")
            if cfg.family == "llama":
                q, k = unpermute_qk(q, cfg.n_heads), unpermute_qk(k, cfg.n_kv_heads)
            p.update(W_q=q.T, W_k=k.T, W_v=need(b + "attn_v.weight").T, W_gate=need(b + "ffn_gate.weight").T)
            if cfg.qkv_bias:
                qb, kb = need(b + "attn_q.bias"), need(b + "attn_k.bias")
                if cfg.family == "llama":
                    qb, kb = unpermute_qk(qb, cfg.n_heads), unpermute_qk(kb, cfg.n_kv_heads)
                p.update(b_q=qb, b_k=kb, b_v=need(b + "attn_v.bias"))
            if cfg.family == "gemma2":
                p["ln_attn_post_w"] = need(b + "post_attention_norm.weight") - norm_shift
                p["ln_mlp_post_w"] = need(b + "post_ffw_norm.weight") - norm_shift
        layers.append(p)
    params = {"embed": need("token_embd.weight"), "ln_f_w": need("output_norm.weight") - norm_shift,
              "blocks": stack_layers(cfg, layers, g.path)}
    if cfg.family == "gpt2":
        params["pos_embed"] = need("position_embd.weight")
        params["ln_f_b"] = need("output_norm.bias")
    if not cfg.tied_embeddings:
        params["unembed"] = need("output.weight").T
    params = {k: (np.ascontiguousarray(v, np.float32) if not isinstance(v, dict) else
                  {kk: np.ascontiguousarray(vv) for kk, vv in v.items()}) for k, v in params.items()}
    check_param_shapes(cfg, params, g.path)
    return params


def load_gguf_model(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], Tokenizer | None]:
    """(config, params, tokenizer or None) from a GGUF file."""
    g = read_gguf(path)
    cfg = config_from_gguf(g)
    params = params_from_gguf(cfg, g)
    tokenizer = None
    if "tokenizer.ggml.tokens" in g.metadata:
        tokenizer = Tokenizer.from_gguf(g)
    return cfg, params, tokenizer
