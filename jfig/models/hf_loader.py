"""HF model folders (config.json + safetensors, single or sharded) -> ModelConfig + params.

One short name map per family, in the spirit of TransformerLens's weight conversions.
HF nn.Linear weights are [out, in] and are transposed to jfig's [in, out]; GPT-2's
Conv1D weights are already [in, out].
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file

from ..errors import FormatError
from .config import ModelConfig, RopeScaling, gemma2_config, gpt2_config, llama_config
from .forward import init_params

LLAMA_TYPES = ("llama", "mistral", "qwen2", "smollm", "smollm2")


def _req(cfg: dict, key: str, path, *alts):
    for k in (key,) + alts:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    raise FormatError(f"{path}: config.json lacks the required key {key!r}")


def config_from_hf(cfg: dict[str, Any], path: str | os.PathLike = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict (GPT-2, Llama family, Gemma-2)."""
    mtype = cfg.get("model_type")
    if mtype == "gpt2":
        d, h = _req(cfg, "n_embd", path), _req(cfg, "n_head", path)
        return gpt2_config(n_layers=_req(cfg, "n_layer", path), d_model=d, n_heads=h, n_kv_heads=h, d_head=d // h,
                           d_mlp=cfg.get("n_inner") or 4 * d, vocab_size=_req(cfg, "vocab_size", path),
                           max_seq_len=_req(cfg, "n_positions", path), norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                           act={"gelu_new": "gelu_tanh", "gelu": "gelu"}.get(cfg.get("activation_function", "gelu_new"), "gelu_tanh"),
                           name=cfg.get("_name_or_path", "gpt2"))
    d = _req(cfg, "hidden_size", path)
    h = _req(cfg, "num_attention_heads", path)
    common = dict(n_layers=_req(cfg, "num_hidden_layers", path), d_model=d, n_heads=h,
                  n_kv_heads=cfg.get("num_key_value_heads") or h, d_head=cfg.get("head_dim") or d // h,
                  d_mlp=_req(cfg, "intermediate_size", path), vocab_size=_req(cfg, "vocab_size", path),
                  max_seq_len=cfg.get("max_position_embeddings", 8192),
                  rope_theta=float(_rope_params(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0))),
                  name=cfg.get("_name_or_path", mtype or ""))
    if mtype == "gemma2":
        win = cfg.get("sliding_window")
        return gemma2_config(**common, query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                             sliding_window=win, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                             attn_softcap=cfg.get("attn_logit_softcapping"),
                             final_softcap=cfg.get("final_logit_softcapping"),
                             act="gelu_tanh" if "tanh" in cfg.get("hidden_activation", "gelu_pytorch_tanh") else "gelu",
                             **_gemma_layer_types(cfg, common["n_layers"], win))
    if mtype in LLAMA_TYPES or mtype is None:
        act = cfg.get("hidden_act", "silu")
        return llama_config(**common, norm_eps=cfg.get("rms_norm_eps", 1e-6), act="silu" if act == "silu" else act,
                            rope_scaling=_llama3_scaling(cfg, path), qkv_bias=bool(cfg.get("attention_bias", mtype == "qwen2")),
                            o_bias=False, mlp_bias=bool(cfg.get("mlp_bias", False)),
                            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    raise FormatError(f"{path}: model_type {mtype!r} is not supported; expected gpt2, gemma2 or one of {LLAMA_TYPES}")


def _rope_params(cfg: dict) -> dict:
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _gemma_layer_types(cfg: dict, n_layers: int, win) -> dict:
    types = cfg.get("layer_types")
    if types and win:
        return {"sliding_layers": tuple(t == "sliding_attention" for t in types)}
    return {}


def _llama3_scaling(cfg: dict, path) -> RopeScaling | None:
    rs = _rope_params(cfg)
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise FormatError(f"{path}: rope scaling type {kind!r} is not supported (only 'llama3')")
    return RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                       int(rs["original_max_position_embeddings"]))


# HF name (per layer, after 'model.layers.{i}.') -> (jfig name, transpose?)
_LLAMA_LAYER = {
    "input_layernorm.weight": ("ln1_w", False),
    "self_attn.q_proj.weight": ("W_q", True), "self_attn.k_proj.weight": ("W_k", True),
    "self_attn.v_proj.weight": ("W_v", True), "self_attn.o_proj.weight": ("W_o", True),
    "self_attn.q_proj.bias": ("b_q", False), "self_attn.k_proj.bias": ("b_k", False),
    "self_attn.v_proj.bias": ("b_v", False),
    "post_attention_layernorm.weight": ("ln2_w", False),
    "mlp.gate_proj.weight": ("W_gate", True), "mlp.up_proj.weight": ("W_up", True),
    "mlp.down_proj.weight": ("W_down", True),
}
_GEMMA2_LAYER = dict(_LLAMA_LAYER, **{
    "post_attention_layernorm.weight": ("ln_attn_post_w", False),
    "pre_feedforward_layernorm.weight": ("ln2_w", False),
    "post_feedforward_layernorm.weight": ("ln_mlp_post_w", False),
})
# GPT-2 Conv1D weights are [in, out] already: no transpose. c_attn is split into q, k, v.
_GPT2_LAYER = {
    "ln_1.weight": ("ln1_w", False), "ln_1.bias": ("ln1_b", False),
    "attn.c_proj.weight": ("W_o", False), "attn.c_proj.bias": ("b_o", False),
    "ln_2.weight": ("ln2_w", False), "ln_2.bias": ("ln2_b", False),
    "mlp.c_fc.weight": ("W_up", False), "mlp.c_fc.bias": ("b_up", False),
    "mlp.c_proj.weight": ("W_down", False), "mlp.c_proj.bias": ("b_down", False),
}


def params_from_hf_state_dict(cfg: ModelConfig, sd: dict[str, np.ndarray], path: str | os.PathLike = "state dict"
                              ) -> dict[str, Any]:
    """jfig params from an HF state dict of numpy arrays (any float dtype)."""
    get = lambda k: _get(sd, k, path)  # noqa: E731
    L = cfg.n_layers
    layers: list[dict] = [{} for _ in range(L)]
    if cfg.family == "gpt2":
        sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
        get = lambda k: _get(sd, k, path)  # noqa: E731
        for i in range(L):
            for hf, (name, _) in _GPT2_LAYER.items():
                layers[i][name] = get(f"h.{i}.{hf}")
            w, b = get(f"h.{i}.attn.c_attn.weight"), get(f"h.{i}.attn.c_attn.bias")
            d = cfg.d_model
            layers[i].update(W_q=w[:, :d], W_k=w[:, d:2 * d], W_v=w[:, 2 * d:], b_q=b[:d], b_k=b[d:2 * d], b_v=b[2 * d:])
        params = {"embed": get("wte.weight"), "pos_embed": get("wpe.weight"),
                  "ln_f_w": get("ln_f.weight"), "ln_f_b": get("ln_f.bias")}
    else:
        table = _GEMMA2_LAYER if cfg.family == "gemma2" else _LLAMA_LAYER
        for i in range(L):
            for hf, (name, transpose) in table.items():
                key = f"model.layers.{i}.{hf}"
                if key not in sd and (hf.endswith(".bias") or (name == "W_gate" and cfg.mlp != "gated")):
                    continue
                a = get(key)
                layers[i][name] = a.T if transpose else a
        params = {"embed": get("model.embed_tokens.weight"), "ln_f_w": get("model.norm.weight")}
        if not cfg.tied_embeddings:
            params["unembed"] = get("lm_head.weight").T
    params["blocks"] = stack_layers(cfg, layers, path)
    params = {k: (np.asarray(v, np.float32) if not isinstance(v, dict) else v) for k, v in params.items()}
    check_param_shapes(cfg, params, path)
    return params


def _get(sd: dict, key: str, path):
    if key not in sd:
        near = [k for k in sd if k.split(".")[-1] == key.split(".")[-1]][:3]
        raise FormatError(f"{path}: tensor {key!r} is missing" + (f" (found e.g. {near})" if near else ""))
    return np.asarray(sd[key])


def expected_shapes(cfg: ModelConfig) -> dict[str, Any]:
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: tuple(s.shape), shapes)


def stack_layers(cfg: ModelConfig, layers: list[dict[str, Any]], path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per-layer params -> {name: [n_layers, ...]}, each layer's shape checked against the config first."""
    exp = expected_shapes(cfg)["blocks"]
    blocks = {}
    for k in layers[0]:
        want = exp[k][1:] if k in exp else tuple(np.shape(layers[0][k]))
        for i, layer in enumerate(layers):
            if k not in layer:
                raise FormatError(f"{path}: layer {i} lacks parameter blocks.{k} (expected shape {want})")
            if tuple(np.shape(layer[k])) != want:
                raise FormatError(f"{path}: layer {i} parameter blocks.{k} has shape {tuple(np.shape(layer[k]))}, "
                                  f"expected {want} from the config")
        blocks[k] = np.stack([np.asarray(layer[k], np.float32) for layer in layers])
    return blocks


def check_param_shapes(cfg: ModelConfig, params: dict[str, Any], path: str | os.PathLike) -> None:
    """The loader is its own shape test: every tensor must have the shape the config implies."""
    exp = expected_shapes(cfg)
    if cfg.positional == "learned" and "pos_embed" in params:
        exp["pos_embed"] = (params["pos_embed"].shape[0], cfg.d_model)
    flat_e = {".".join(map(str, k)): v for k, v in _flatten(exp)}
    flat_p = {".".join(map(str, k)): tuple(np.shape(v)) for k, v in _flatten(params)}
    for k, shape in flat_e.items():
        if k not in flat_p:
            raise FormatError(f"{path}: parameter {k} is missing (expected shape {shape})")
        if flat_p[k] != shape:
            raise FormatError(f"{path}: parameter {k} has shape {flat_p[k]}, expected {shape} from the config")


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def read_safetensors_folder(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors or a sharded set (model.safetensors.index.json), as numpy."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise FormatError(f"{index}: not a valid safetensors index (expected a 'weight_map'): {e}") from None
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
        if not files:
            raise FormatError(f"{folder}: no *.safetensors file found (expected model.safetensors or shards)")
    sd = {}
    for name in files:
        f = folder / name
        if not f.exists():
            raise FormatError(f"{f}: shard listed in the index is missing")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for corrupt headers/data
            raise FormatError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    return sd


def load_hf_folder(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from an HF folder with config.json and safetensors weights."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FormatError(f"{folder}: no config.json (expected an HF model folder)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: not valid JSON: {e}") from None
    cfg = config_from_hf(raw, cfg_path)
    return cfg, params_from_hf_state_dict(cfg, read_safetensors_folder(folder), folder)
