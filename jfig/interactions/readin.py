"""How a decoded feature reaches a block's inputs, and the checks every interaction metric shares.

A feature i decoded at a residual-basis site adds a_i·d_i to the residual stream: d_i is its
decoder row (unit-normalised for SAEs that rescale by decoder norm) and a_i = κ·f_i its activation
times the SAE's per-token decode factor κ (std for `layer_norm` SAEs, 1/c for
`constant_norm_rescale`, else 1). A block reads the residual through its norm,

    norm(x) = g(x) · N(x) + b,    N(v) = (P v) ⊙ γ,

where P centres v (LayerNorm) or is the identity (RMSNorm), γ is the norm weight (1 + w for
Gemma), b the LayerNorm bias, and g(x) one scalar per token (1/RMS, or 1/std for LayerNorm).
The interaction metrics freeze g at each token's own value, as jfig's direct effects do
(`freeze=True`): feature i then adds g·a_i·N(d_i) @ W to any linear map W that reads the norm.
Ratios of two features' contributions at one token do not depend on g or κ.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import JfigError, SiteError
from ..models.config import ModelConfig
from ..models.validation import check_sae_fits
from ..saes import SAE
from ..sites import RESIDUAL_BASIS, parse_site

PARTS = ("attn", "mlp")
HIGHEST = jax.lax.Precision.HIGHEST


def mm(a, b):
    """Matrix product at full float32 precision (no TF32 / bf16 passes on accelerators)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def first_reader(site: str, part: str) -> int:
    """The first layer whose `part` ("attn" or "mlp") reads the residual that `site` is or writes into.

    hook_resid_pre L: attention L and MLP L. hook_attn_out / hook_resid_mid L: attention L+1, MLP L.
    hook_mlp_out / hook_resid_post L: both L+1. hook_embed / hook_pos_embed: both 0. Other sites
    (q, k, v, z, pattern, mlp.hook_post) are not in the residual basis and have no such reader."""
    if part not in PARTS:
        raise JfigError(f"part must be one of {PARTS}, got {part!r}")
    s = parse_site(site)
    if s.layer < 0:
        return 0
    if s.local not in RESIDUAL_BASIS:
        raise SiteError(f"site {site!r} is not in the residual basis ({', '.join(sorted(RESIDUAL_BASIS))}): "
                        f"its features are not read by a block's {'MLP' if part == 'mlp' else 'attention'} "
                        f"through the residual stream")
    if part == "mlp":
        return s.layer + (s.local in ("hook_mlp_out", "hook_resid_post"))
    return s.layer + (s.local != "hook_resid_pre")


def reading_layer(site: str, n_layers: int, part: str, layer: int | None = None) -> int:
    """The layer whose `part` reads the features of `site`: `layer` when given (it must be at or after
    the first reader and inside the model), else the first reader."""
    first = first_reader(site, part)
    if layer is None:
        layer = first
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise JfigError(f"layer must be an int, got {type(layer).__name__}")
    what = "MLP" if part == "mlp" else "attention"
    if first >= n_layers:
        raise SiteError(f"no {what} reads site {site!r}: the model's last layer is {n_layers - 1}")
    if not first <= layer < n_layers:
        raise SiteError(f"layer {layer}'s {what} does not read site {site!r}: expected a layer in "
                        f"[{first}, {n_layers - 1}]")
    return int(layer)


def check_finite(name: str, x) -> None:
    """Raise JfigError if `x` holds NaN or infinite values."""
    bad = int(np.size(x) - np.isfinite(np.asarray(x)).sum())
    if bad:
        raise JfigError(f"{name} contains {bad} NaN or infinite value(s)")


def check_model_sae(model: Any, sae: Any, what: str) -> ModelConfig:
    """A built-in model and a finite SAE at one of its residual-basis sites, as wide as that site."""
    if getattr(model, "config", None) is None or getattr(model, "apply_fn", None) is not None:
        raise JfigError(f"{what} reads the model's weights: it needs a built-in model (GPT-2, Llama, Gemma-2), "
                        f"not one wrapped with Model.from_function")
    if not isinstance(sae, SAE):
        raise JfigError(f"{what} takes an SAE (jfig.SAE), got {type(sae).__name__}")
    model.check_site(sae.site)
    check_sae_fits(sae, model.site_width(sae.site))
    check_finite(f"the SAE at {sae.site} (W_dec)", sae.W_dec)
    return model.config


def layer_params(model: Any, layer: int, names: tuple[str, ...]) -> dict:
    """{name: params["blocks"][name][layer]} for the names the model has, each checked finite."""
    blocks = model.params["blocks"]
    out = {k: blocks[k][layer] for k in names if k in blocks}
    for k, v in out.items():
        check_finite(f"model parameter blocks.{k}[{layer}]", v)
    return out


def norm_scale(cfg: ModelConfig, x):
    """g(x) [...] of the norm at x [..., d]: 1/sqrt(mean(x²) + eps), x centred first for LayerNorm."""
    x = jnp.asarray(x, jnp.float32)
    if cfg.norm == "layer":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    return jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + cfg.norm_eps)


def norm_map(cfg: ModelConfig, v, w):
    """N(v) [..., d] = (P v) ⊙ γ: the norm at unit scale without its bias (linear in v)."""
    v = jnp.asarray(v, jnp.float32)
    if cfg.norm == "layer":
        v = v - jnp.mean(v, axis=-1, keepdims=True)
    return v * (cfg.norm_offset + w)


def feature_directions(sae: SAE, features=None):
    """[n, d_in] the residual direction of one unit of each feature (all features when None)."""
    rows = sae.W_dec if features is None else sae.W_dec[jnp.asarray(features)]
    rows = jnp.asarray(rows, jnp.float32)
    if sae.rescale_acts_by_decoder_norm:
        rows = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
    return rows


def decode_scale(sae: SAE, stats, shape):
    """κ [shape]: the per-token factor `SAE.decode_direction` applies to `feature_directions` (std for
    layer_norm SAEs, 1/c for constant_norm_rescale, else 1); `stats` from `encode_with_stats`, `shape`
    the token shape ([b, s])."""
    if sae.normalize_activations == "layer_norm":
        return stats["std"][..., 0]
    if sae.normalize_activations == "constant_norm_rescale":
        return 1.0 / stats["scale"][..., 0]
    return jnp.ones(shape, jnp.float32)
