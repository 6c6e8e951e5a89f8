"""Read and write SAEs: SAELens folders (v6 and pre-6.0), Gemma Scope ``params.npz``, jfig's own; and
SAEs by release name (SAELens registry, Gemma Scope) from the local Hugging Face cache.

jfig's native format *is* a SAELens v6 folder (``cfg.json``, ``sae_weights.safetensors``, optional
``sparsity.safetensors``) whose ``cfg.json`` metadata carries a few extra ``jfig_*`` keys, so
SAELens users can load what jfig saves. See FORMATS.md sections (a), (b) and (e).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file

from jfig.data.files import atomic_folder
from jfig.errors import FormatError, JfigError, OptionError, SiteError
from jfig.models.hub_cache import DEFAULT_REVISION
from jfig.saes.registry import GEMMA_SCOPE_FORMAT, locate_sae
from jfig.saes.sae import SAE, fold_activation_norm_scaling_factor
from jfig.saes.transcoder import Transcoder, input_site, output_site

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_LENS_VERSION = "6.0.0"

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
_UNSUPPORTED = {
    "gated": "gated SAEs are not supported yet",
    **{arch: "transcoders are not supported by load_sae: a transcoder reads one site and writes another; "
             "load it with load_transcoders (a list of jfig.saes.Transcoder)"
       for arch in ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")},
}
# SAELens transcoder architectures: (activation, skip connection).
_TRANSCODER_ARCHS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                     "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
CT_CONFIG_FILE = "config.yaml"
# Pre-6.0 keys that stay top-level; every other leftover key moves into metadata.
_CORE_KEYS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
              "reshape_activations", "architecture", "k", "rescale_acts_by_decoder_norm",
              "finetuning_scaling_factor", "metadata"}
# SAELens's LLM_METADATA_KEYS: registry config overrides of these keys land in the cfg's metadata.
_METADATA_KEYS = {"model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                  "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                  "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                  "hook_head_index_out"}
# Sites in the residual basis, which TransformerLens's center_writing_weights centres.
_RESID_SITE = re.compile(r"hook_embed|hook_pos_embed|blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out)")
# Gemma-2 attention widths: d_in -> (n_heads, d_head) for the 2b, 9b and 27b Gemma Scope att SAEs.
_GEMMA2_HOOK_Z = {2048: (8, 256), 4096: (16, 256), 4608: (32, 128)}


# ---------------------------------------------------------------------------------- load


def load_sae_ref(ref) -> SAE:
    """An SAE from a command-line reference: an existing path, or RELEASE:SAE_ID (a release name and
    the SAE's id in it, e.g. gemma-scope-2b-pt-res:layer_3/width_16k/average_l0_14), from the cache."""
    text = str(ref)
    if Path(text).exists():
        return load_sae(text)
    release, sep, sae_id = text.partition(":")
    if not sep or not release or not sae_id:
        raise JfigError(f"SAE {text!r} is neither an existing path nor RELEASE:SAE_ID (e.g. "
                        f"gemma-scope-2b-pt-res:layer_3/width_16k/average_l0_14)")
    return load_sae(release=release, sae_id=sae_id)


def load_sae(path=None, *, release: str | None = None, sae_id: str | None = None, revision: str = DEFAULT_REVISION,
             registry=None, site: str | None = None, dtype=jnp.float32, hook_z_shape: tuple[int, int] | None = None,
             norm_scaling_factor: float | None = None) -> SAE:
    """Load an SAE from a SAELens folder, a Gemma Scope ``params.npz``, or a folder jfig saved; or by
    release name from the local Hugging Face cache.

    ``path``: a folder with ``cfg.json`` + ``sae_weights.safetensors``; a ``.safetensors`` file or
    ``cfg.json`` inside such a folder; a ``params.npz`` file, or a folder holding one.

    ``release`` and ``sae_id`` (instead of ``path``): a release of SAELens's registry
    (``sae_lens/pretrained_saes.yaml`` when sae-lens is installed, or the file ``registry`` /
    ``$JFIG_SAE_REGISTRY`` names), e.g. ``"gpt2-small-res-jb"`` / ``"blocks.8.hook_resid_pre"`` or
    ``"gemma-scope-2b-pt-res-canonical"`` / ``"layer_0/width_16k/canonical"``; a Gemma Scope release
    without the registry (``"gemma-scope-2b-pt-res"`` / ``"layer_3/width_16k/average_l0_71"``); or a
    repo id ``"org/name"`` with ``sae_id`` the folder in it. The files come from the local Hugging Face
    cache at ``revision``; nothing is downloaded, and a FormatError says which files to fetch and
    where to put them (docs/loading.md). The registry's norm scaling factor, Neuronpedia id and config
    overrides apply as in SAELens; a Gemma Scope SAE's site is fixed by its release.

    ``site`` overrides the hook name from the config (SAELens ``metadata.hook_name``, pre-6.0
    ``hook_name``/``hook_point``) or the Gemma Scope path. ``dtype`` is the array dtype (None: the
    cfg's ``dtype``). ``hook_z_shape`` gives ``(n_heads, d_head)`` for hook_z SAEs whose files do not
    say it. ``norm_scaling_factor`` is folded in for ``normalize_activations ==
    "expected_average_only_in"`` (SAELens's per-release factor); without it that mode means "none".

    Gemma Scope: jumprelu with ``apply_b_dec_to_input=False``. The site comes from the path
    ``<release>-{res,mlp,att}/layer_L/width_*/average_l0_*/params.npz`` (res: blocks.L.hook_resid_post,
    mlp: blocks.L.hook_mlp_out, att: blocks.L.attn.hook_z); ``embedding/width_*/...`` SAEs get site
    hook_embed and ``W_enc /= sqrt(d_in)``, ``W_dec *= sqrt(d_in)``, as SAELens does.

    GPT-2 centring: the GPT-2 residual SAEs of SAELens (e.g. ``gpt2-small-res-jb``) were trained on
    TransformerLens activations with ``center_writing_weights=True``, which equal raw residuals minus
    their per-token mean. When the metadata's ``model_name`` starts with "gpt2" (or
    ``model_class_name`` names GPT2), ``model_from_pretrained_kwargs.center_writing_weights`` is true
    and the site is in the residual basis, the SAE gets ``center_input=True`` so raw-model
    activations are centred before encoding. A ``jfig_center_input`` metadata key (written by
    :func:`save_sae`) takes precedence.

    Raises FormatError naming the file and field for anything missing, corrupt or unsupported.
    """
    if release is not None or sae_id is not None:
        if path is not None:
            raise OptionError("load_sae takes a path or release= with sae_id=, not both", "release")
        if release is None or sae_id is None:
            raise OptionError(f"load_sae by name needs both release= and sae_id= (got release={release!r}, "
                              f"sae_id={sae_id!r})", "sae_id" if sae_id is None else "release")
        return _load_release(release, sae_id, revision, registry, site, dtype, hook_z_shape, norm_scaling_factor)
    if path is None:
        raise OptionError("load_sae needs a path, or release= and sae_id=", "path")
    if revision != DEFAULT_REVISION or registry is not None:
        raise OptionError("revision= and registry= apply to load_sae(release=..., sae_id=...), not to a path",
                          "revision" if revision != DEFAULT_REVISION else "registry")
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder; expected a SAELens folder (cfg.json + "
                          f"sae_weights.safetensors) or a Gemma Scope params.npz")
    dtype = None if dtype is None else jnp.dtype(dtype)
    if path.is_dir():
        if (path / CFG_FILE).exists() or (path / WEIGHTS_FILE).exists():
            return _load_saelens(path, path / WEIGHTS_FILE, site, dtype, hook_z_shape, norm_scaling_factor)
        if (path / "params.npz").exists():
            return _load_gemma_scope(path / "params.npz", site, dtype, hook_z_shape)
        if (path / CT_CONFIG_FILE).exists():
            raise FormatError(f"{path}: a circuit-tracer transcoder folder ({CT_CONFIG_FILE}); load it with "
                              f"load_transcoders, not load_sae")
        raise FormatError(f"{path}: folder has neither {CFG_FILE} + {WEIGHTS_FILE} (SAELens) nor params.npz "
                          f"(Gemma Scope)")
    if path.suffix == ".npz":
        return _load_gemma_scope(path, site, dtype, hook_z_shape)
    if path.suffix == ".safetensors":
        return _load_saelens(path.parent, path, site, dtype, hook_z_shape, norm_scaling_factor)
    if path.name == CFG_FILE:
        return _load_saelens(path.parent, path.parent / WEIGHTS_FILE, site, dtype, hook_z_shape,
                             norm_scaling_factor)
    raise FormatError(f"{path}: unknown SAE file type; expected a folder, a .safetensors file beside a "
                      f"cfg.json, or a Gemma Scope params.npz")


def _load_release(release, sae_id, revision, registry, site, dtype, hook_z_shape, norm_scaling_factor) -> SAE:
    source, file = locate_sae(release, sae_id, revision=revision, registry=registry)
    dtype = None if dtype is None else jnp.dtype(dtype)
    extra = {"neuronpedia_id": source.neuronpedia_id} if source.neuronpedia_id else {}
    if source.format == GEMMA_SCOPE_FORMAT:
        return _load_gemma_scope(file, site or source.site, dtype, hook_z_shape, extra)
    overrides = {**(source.config_overrides or {}), **extra}
    factor = norm_scaling_factor if norm_scaling_factor is not None else source.norm_scaling_factor
    return _load_saelens(file.parent, file.parent / WEIGHTS_FILE, site, dtype, hook_z_shape, factor, overrides)


def load_sparsity(path) -> np.ndarray | None:
    """``sparsity [d_sae]`` (log10 firing frequency) from a SAELens folder, or None if absent."""
    file = Path(path) / SPARSITY_FILE if Path(path).is_dir() else Path(path).parent / SPARSITY_FILE
    if not file.exists():
        return None
    return _read_safetensors(file, required=("sparsity",))["sparsity"]


def _read_json(file: Path) -> dict:
    if not file.exists():
        raise FormatError(f"{file}: missing; a SAELens folder needs {CFG_FILE} beside {WEIGHTS_FILE}")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(file: Path, required=()) -> dict[str, np.ndarray]:
    if not file.exists():
        raise FormatError(f"{file}: missing; expected a safetensors file of SAE weights")
    try:
        with safe_open(str(file), framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise FormatError(f"{file}: cannot read safetensors, the file is truncated or corrupt ({e})") from e
    for key in required:
        if key not in tensors:
            raise FormatError(f"{file}: tensor {key!r} is missing; found {sorted(tensors)}")
    return tensors


def _parse_dtype(value, cfg_file: Path):
    name = str(value or "float32").removeprefix("torch.")
    if name not in _DTYPES:
        raise FormatError(f"{cfg_file}: field 'dtype' is {value!r}; expected one of {sorted(_DTYPES)} "
                          f"(optionally 'torch.'-prefixed)")
    return jnp.dtype(_DTYPES[name])


def _is_pre_6(cfg: dict) -> bool:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    match = re.match(r"\s*v?(\d+)", str(version)) if version else None
    return match is None or int(match.group(1)) < 6


def _upgrade_pre_6(cfg: dict, cfg_file: Path) -> dict:
    """SAELens's handle_pre_6_0_config: flat legacy keys -> the v6 layout."""
    cfg = dict(cfg)
    for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                     ("activation_fn_str", "activation_fn"), ("hook_point_layer", "hook_layer")):
        if old in cfg:
            cfg.setdefault(new, cfg.pop(old))
    cfg.pop("hook_layer", None)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    if cfg.get("reshape_activations") is None:
        cfg["reshape_activations"] = "hook_z" if "hook_z" in str(cfg.get("hook_name") or "") else "none"
    activation = cfg.pop("activation_fn", None) or "relu"
    kwargs = cfg.pop("activation_fn_kwargs", None) or {}
    if activation == "topk":
        if "k" not in kwargs:
            raise FormatError(f"{cfg_file}: activation_fn 'topk' needs activation_fn_kwargs.k")
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    elif activation != "relu" and cfg["architecture"] == "standard":
        raise FormatError(f"{cfg_file}: field 'activation_fn' is {activation!r}; only 'relu' and 'topk' are supported")
    norm = cfg.get("normalize_activations")
    if norm is None or norm is False:
        cfg["normalize_activations"] = "none"
    elif norm is True:
        cfg["normalize_activations"] = "expected_average_only_in"
    metadata = dict(cfg.get("metadata") or {})
    for key in list(cfg):
        if key not in _CORE_KEYS:
            metadata.setdefault(key, cfg.pop(key))
    cfg["metadata"] = metadata
    return cfg


def _gpt2_centred(meta: dict, site: str) -> bool:
    name = str(meta.get("model_name") or "").lower()
    cls = str(meta.get("model_class_name") or "").lower()
    kwargs = meta.get("model_from_pretrained_kwargs") or {}
    return ((name.startswith("gpt2") or "gpt2" in cls) and isinstance(kwargs, dict)
            and kwargs.get("center_writing_weights") is True and bool(_RESID_SITE.fullmatch(site)))


def _check_shape(file: Path, name: str, array: np.ndarray, want: tuple) -> None:
    if tuple(array.shape) != tuple(want):
        raise FormatError(f"{file}: tensor {name!r} has shape {list(array.shape)}; expected {list(want)} "
                          f"from d_in/d_sae")


def _load_saelens(folder: Path, weights_file: Path, site, dtype, hook_z_shape, norm_scaling_factor,
                  overrides: dict | None = None) -> SAE:
    cfg_file = folder / CFG_FILE
    cfg = _read_json(cfg_file)
    pre_6 = _is_pre_6(cfg)
    if overrides:  # a registry's config_overrides (+ neuronpedia_id), applied as SAELens does
        cfg.update(overrides)
    if pre_6:
        cfg = _upgrade_pre_6(cfg, cfg_file)
    elif overrides:  # v6 configs keep metadata apart: the overrides' metadata keys go there
        metadata = dict(cfg.get("metadata") or {})
        for key in overrides:
            if key in _METADATA_KEYS:
                metadata.setdefault(key, cfg.pop(key))
        cfg["metadata"] = metadata
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise FormatError(f"{cfg_file}: required field {key!r} is {cfg.get(key, 'missing')!r}; "
                              f"expected a positive int")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    metadata = dict(cfg.get("metadata") or {})
    jfig = {key: metadata.pop(key) for key in list(metadata) if key.startswith("jfig_")}

    arch = cfg.get("architecture", "standard")
    if arch in _UNSUPPORTED:
        raise FormatError(f"{cfg_file}: field 'architecture' is {arch!r}: {_UNSUPPORTED[arch]}; "
                          f"expected 'standard', 'jumprelu', 'topk' or 'batchtopk'")
    arch = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
            "batchtopk": "batchtopk"}.get(arch)
    if arch is None:
        raise FormatError(f"{cfg_file}: field 'architecture' is {cfg.get('architecture')!r}; "
                          f"expected 'standard', 'jumprelu', 'topk' or 'batchtopk'")
    if arch == "jumprelu" and jfig.get("jfig_architecture") == "batchtopk":
        arch = "batchtopk"

    norm = cfg.get("normalize_activations", "none")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm) \
        if not isinstance(norm, str) else norm
    if norm not in ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"):
        raise FormatError(f"{cfg_file}: field 'normalize_activations' is {norm!r}; expected 'none', "
                          f"'expected_average_only_in', 'constant_norm_rescale' or 'layer_norm'")

    tensors = _read_safetensors(weights_file, required=("W_enc", "W_dec", "b_dec"))
    if arch in ("jumprelu", "batchtopk") and "threshold" not in tensors:
        if "log_threshold" in tensors:
            tensors["threshold"] = np.exp(tensors.pop("log_threshold").astype(np.float32))
        elif "topk_threshold" in tensors:
            tensors["threshold"] = tensors.pop("topk_threshold")
        else:
            raise FormatError(f"{weights_file}: tensor 'threshold' is missing; a {arch} SAE needs it "
                              f"([{d_sae}] or a scalar)")
    if "b_enc" not in tensors:
        raise FormatError(f"{weights_file}: tensor 'b_enc' is missing; found {sorted(tensors)}")
    if "threshold" in tensors and arch in ("jumprelu", "batchtopk") and tensors["threshold"].size == 1:
        tensors["threshold"] = np.broadcast_to(tensors["threshold"].reshape(()), (d_sae,))
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch in ("jumprelu", "batchtopk"):
        want["threshold"] = (d_sae,)
    for name, shape in want.items():
        _check_shape(weights_file, name, tensors[name], shape)
    if "scaling_factor" in tensors:
        _fold_legacy_scaling_factor(tensors, weights_file, d_sae, cfg.get("finetuning_scaling_factor"))

    site = site or metadata.get("hook_name") or cfg.get("hook_name")
    if not site:
        raise FormatError(f"{cfg_file}: no hook name in metadata.hook_name; pass site= to load_sae")
    center = jfig.get("jfig_center_input")
    center = bool(center) if center is not None else _gpt2_centred(metadata, site)
    reshape = cfg.get("reshape_activations", "none") == "hook_z"
    shape_z = hook_z_shape or jfig.get("jfig_hook_z_shape")
    k = cfg.get("k")
    if arch == "topk" and (not isinstance(k, int) or isinstance(k, bool)):
        raise FormatError(f"{cfg_file}: field 'k' is {k!r}; a topk SAE needs an int k")

    dtype = dtype if dtype is not None else _parse_dtype(cfg.get("dtype"), cfg_file)
    sae = _build(tensors, dtype, site=site, architecture=arch, k=k if arch == "topk" else None,
                 apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                 normalize_activations="none" if norm == "expected_average_only_in" else norm,
                 rescale_acts_by_decoder_norm=arch == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm")),
                 center_input=center, reshape_hook_z=reshape,
                 hook_z_shape=tuple(shape_z) if reshape and shape_z else None, metadata=metadata)
    if norm == "expected_average_only_in" and norm_scaling_factor is not None:
        sae = fold_activation_norm_scaling_factor(sae, norm_scaling_factor)
    return sae


def _fold_legacy_scaling_factor(tensors: dict, file: Path, d_sae: int, enabled) -> None:
    """Old SAEs decoded ``(f * scaling_factor) @ W_dec``; fold it into W_dec, or drop all-ones."""
    factor = tensors.pop("scaling_factor")
    _check_shape(file, "scaling_factor", factor, (d_sae,))
    if enabled is False or np.all(factor == 1):
        return
    tensors["W_dec"] = factor.astype(np.float32)[:, None] * tensors["W_dec"].astype(np.float32)


def _build(tensors: dict, dtype, **static) -> SAE:
    arrays = {name: jnp.asarray(np.asarray(tensors[name]), dtype=dtype)
              for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if static["architecture"] in ("jumprelu", "batchtopk"):
        arrays["threshold"] = jnp.asarray(np.asarray(tensors["threshold"]), dtype=dtype)
    return SAE(**arrays, **static)


def _gemma_scope_site(file: Path) -> tuple[str | None, bool]:
    """(site or None, is_embedding) from a path like ``gemma-scope-2b-pt-res/layer_3/.../params.npz``.

    The path as given is read first: in the Hugging Face cache ``params.npz`` is a link into
    ``blobs/``, so only the link's own path names the release and layer. A path that says nothing
    is read again with its links resolved."""
    site, embedding = _gemma_scope_site_of(Path(os.path.abspath(file)).parts[:-1])
    return (site, embedding) if site else _gemma_scope_site_of(file.resolve().parts[:-1])


def _gemma_scope_site_of(parts: tuple[str, ...]) -> tuple[str | None, bool]:
    if "embedding" in parts:  # Gemma Scope: embedding/width_4k/average_l0_N/params.npz
        return "hook_embed", True
    layer_at = [i for i, part in enumerate(parts) if re.fullmatch(r"layer_\d+", part)]
    if not layer_at:
        return None, False
    layer = int(parts[layer_at[-1]].split("_")[1])
    for part in reversed(parts[:layer_at[-1]]):
        tokens = set(re.split(r"[-_.]", part.lower()))
        if tokens & {"res", "resid"}:
            return f"blocks.{layer}.hook_resid_post", False
        if "mlp" in tokens:
            return f"blocks.{layer}.hook_mlp_out", False
        if tokens & {"att", "attn"}:
            return f"blocks.{layer}.attn.hook_z", False
    return None, False


def _load_gemma_scope(file: Path, site, dtype, hook_z_shape, extra_metadata: dict | None = None) -> SAE:
    if "transcoder" in str(file).lower():
        raise FormatError(f"{file}: Gemma Scope transcoders are not supported yet")
    try:
        with np.load(file, allow_pickle=False) as npz:
            tensors = {key.replace("w_", "W_", 1) if key.startswith("w_") else key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError, zlib.error) as e:
        raise FormatError(f"{file}: cannot read npz, the file is truncated or corrupt ({e})") from e
    for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        if key not in tensors:
            raise FormatError(f"{file}: array {key!r} is missing; Gemma Scope params.npz has W_enc, W_dec, "
                              f"b_enc, b_dec, threshold; found {sorted(tensors)}")
    if tensors["W_enc"].ndim != 2:
        raise FormatError(f"{file}: array 'W_enc' has shape {list(tensors['W_enc'].shape)}; expected [d_in, d_sae]")
    d_in, d_sae = tensors["W_enc"].shape
    if tensors["threshold"].size == 1:
        tensors["threshold"] = np.broadcast_to(tensors["threshold"].reshape(()), (d_sae,))
    for name, shape in {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}.items():
        _check_shape(file, name, tensors[name], shape)
    if "scaling_factor" in tensors:
        _fold_legacy_scaling_factor(tensors, file, d_sae, None)

    derived, embedding = _gemma_scope_site(file)
    site = site or derived
    if not site:
        raise FormatError(f"{file}: cannot derive the site from the path (expected "
                          f"'<release>-{{res,mlp,att}}/layer_L/width_*/average_l0_*/params.npz'); pass site= to load_sae")
    if embedding:  # Gemma Scope embedding SAEs saw embeddings before Gemma's sqrt(d_model) multiplier
        tensors["W_enc"] = tensors["W_enc"] / math.sqrt(d_in)
        tensors["W_dec"] = tensors["W_dec"] * math.sqrt(d_in)
    reshape = site.endswith("hook_z")
    if reshape and hook_z_shape is None and re.search(r"gemma-scope-(2b|9b|27b)", str(file)):
        hook_z_shape = _GEMMA2_HOOK_Z.get(d_in)
    meta = {"hook_name": site, "source_format": "gemma_scope", "prepend_bos": True, **(extra_metadata or {})}
    return _build(tensors, dtype or jnp.float32, site=site, architecture="jumprelu", apply_b_dec_to_input=False,
                  reshape_hook_z=reshape, hook_z_shape=tuple(hook_z_shape) if reshape and hook_z_shape else None,
                  metadata=meta)


# ---------------------------------------------------------------------------------- save


def save_sae(sae: SAE, path, *, sparsity=None) -> Path:
    """Write ``sae`` as a SAELens v6 folder at ``path``: cfg.json, sae_weights.safetensors and, if
    ``sparsity [d_sae]`` (log10 firing frequency) is given, sparsity.safetensors.

    jfig-only settings go in ``metadata`` as ``jfig_center_input``, ``jfig_architecture`` and
    ``jfig_hook_z_shape``; a batchtopk SAE is written as SAELens's "jumprelu". The folder is built
    beside ``path`` and renamed into place, so a crash never leaves a half-written folder. An
    existing folder is replaced only if it holds nothing but SAE files.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FormatError(f"{path}: exists and is not a folder; save_sae writes a SAELens folder")
        extra = {p.name for p in path.iterdir()} - {CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE}
        if extra:
            raise FormatError(f"{path}: folder holds other files {sorted(extra)}; refusing to replace it")
    arch = {"relu": "standard", "batchtopk": "jumprelu"}.get(sae.architecture, sae.architecture)
    metadata = {**sae.meta, "hook_name": sae.site, "sae_lens_version": SAE_LENS_VERSION,
                "jfig_center_input": sae.center_input, "jfig_architecture": sae.architecture,
                "jfig_hook_z_shape": list(sae.hook_z_shape) if sae.hook_z_shape else None}
    cfg: dict[str, Any] = {
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": str(jnp.dtype(sae.W_enc.dtype)), "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": sae.normalize_activations,
        "reshape_activations": "hook_z" if sae.reshape_hook_z else "none", "architecture": arch,
        "metadata": metadata,
    }
    if sae.architecture == "topk":
        cfg["k"], cfg["rescale_acts_by_decoder_norm"] = sae.k, sae.rescale_acts_by_decoder_norm
    tensors = {name: np.asarray(getattr(sae, name)) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.threshold is not None:
        tensors["threshold"] = np.asarray(sae.threshold)
    if sparsity is not None:
        sparsity = np.asarray(sparsity, np.float32)
        if sparsity.shape != (sae.d_sae,):
            raise FormatError(f"save_sae: sparsity has shape {list(sparsity.shape)}; expected [{sae.d_sae}]")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with open(tmp / CFG_FILE, "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if sparsity is not None:
            save_file({"sparsity": sparsity}, str(tmp / SPARSITY_FILE))
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            old = tmp.with_suffix(".old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------- transcoders


def load_transcoders(path, *, dtype=jnp.float32, model=None) -> list[Transcoder]:
    """Load transcoders: a list of :class:`~jfig.saes.transcoder.Transcoder`, one per layer (one
    for a SAELens folder).

    ``path``: a SAELens transcoder folder (``cfg.json`` with architecture ``transcoder``,
    ``skip_transcoder``, ``jumprelu_transcoder`` or ``jumprelu_skip_transcoder``, metadata
    ``hook_name`` / ``hook_name_out``; or a ``cfg.json`` / ``.safetensors`` inside one), or a
    circuit-tracer folder (``config.yaml`` with ``model_kind: transcoder_set`` and
    ``layer_{i}.safetensors`` for i = 0..n-1, or a ``transcoders`` list of local files). Weights are
    stored in jfig's orientation (``x @ W``): circuit-tracer's ``W_enc`` (d_tc, d_model) and every
    ``W_skip`` (used as ``x @ W_skip.T``) are transposed on load. circuit-tracer's JumpReLU keeps
    ``pre`` above the threshold (no relu); SAELens's keeps ``relu(pre)``.

    ``model``: a built-in jfig Model whose second norm the transcoders reading ``ln2.hook_normalized``
    or ``mlp.hook_in`` apply (see :meth:`Transcoder.with_input_norm`); without it they must be
    given one before they encode. Cross-layer transcoders (``model_kind: cross_layer_transcoder``,
    ``W_enc_{i}`` / ``W_dec_{i}`` files) load as one Transcoder per read layer whose ``W_dec_later``
    writes the later layers (see :class:`Transcoder`; :func:`save_clt` writes the format).

    ``load_sae`` refuses transcoder folders and points here.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder; expected a SAELens transcoder folder (cfg.json) or "
                          f"a circuit-tracer folder ({CT_CONFIG_FILE})")
    dtype = jnp.dtype(dtype) if dtype is not None else None
    if path.is_file():
        if path.name == CT_CONFIG_FILE:
            path = path.parent
        elif path.name == CFG_FILE or path.suffix == ".safetensors":
            path = path.parent
    if (path / CFG_FILE).exists():
        out = [_load_saelens_transcoder(path, dtype)]
    elif (path / CT_CONFIG_FILE).exists():
        out = _load_ct_transcoders(path, dtype)
    else:
        raise FormatError(f"{path}: folder has neither {CFG_FILE} (SAELens transcoder) nor {CT_CONFIG_FILE} "
                          f"(circuit-tracer transcoders)")
    return out if model is None else [t.with_input_norm(model) for t in out]


def _load_saelens_transcoder(folder: Path, dtype) -> Transcoder:
    cfg_file = folder / CFG_FILE
    cfg = _read_json(cfg_file)
    arch = cfg.get("architecture")
    if arch not in _TRANSCODER_ARCHS:
        raise FormatError(f"{cfg_file}: field 'architecture' is {arch!r}; a transcoder has one of "
                          f"{sorted(_TRANSCODER_ARCHS)} (load SAEs with load_sae)")
    activation, skip = _TRANSCODER_ARCHS[arch]
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise FormatError(f"{cfg_file}: required field {key!r} is {cfg.get(key, 'missing')!r}; "
                              f"expected a positive int")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out", d_in)
    if cfg.get("apply_b_dec_to_input"):
        raise FormatError(f"{cfg_file}: field 'apply_b_dec_to_input' is true; transcoders require false")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none"):
        raise FormatError(f"{cfg_file}: field 'normalize_activations' is {norm!r}; transcoders are supported "
                          f"with 'none' only")
    metadata = dict(cfg.get("metadata") or {})
    read, write = metadata.get("hook_name") or cfg.get("hook_name"), \
        metadata.get("hook_name_out") or cfg.get("hook_name_out")
    if not read or not write:
        raise FormatError(f"{cfg_file}: a transcoder needs metadata.hook_name and metadata.hook_name_out; "
                          f"got {read!r} and {write!r}")
    weights_file = folder / WEIGHTS_FILE
    tensors = _read_safetensors(weights_file, required=("W_enc", "b_enc", "W_dec", "b_dec"))
    if activation == "jumprelu" and "threshold" not in tensors:
        if "log_threshold" not in tensors:
            raise FormatError(f"{weights_file}: tensor 'threshold' is missing; a {arch} needs it ([{d_sae}])")
        tensors["threshold"] = np.exp(tensors.pop("log_threshold").astype(np.float32))
    if skip and "W_skip" not in tensors:
        raise FormatError(f"{weights_file}: tensor 'W_skip' is missing; a {arch} needs it ([{d_out}, {d_in}])")
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if activation == "jumprelu":
        if tensors["threshold"].size == 1:
            tensors["threshold"] = np.broadcast_to(tensors["threshold"].reshape(()), (d_sae,))
        want["threshold"] = (d_sae,)
    if skip:
        want["W_skip"] = (d_out, d_in)
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise FormatError(f"{weights_file}: tensor {name!r} has shape {list(tensors[name].shape)}; expected "
                              f"{list(shape)} from d_in/d_sae/d_out")
    dtype = dtype if dtype is not None else _parse_dtype(cfg.get("dtype"), cfg_file)
    arrays = {name: jnp.asarray(np.asarray(tensors[name]), dtype=dtype)
              for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if skip:
        arrays["W_skip"] = jnp.asarray(np.asarray(tensors["W_skip"]).T, dtype=dtype)
    if activation == "jumprelu":
        arrays["threshold"] = jnp.asarray(np.asarray(tensors["threshold"]), dtype=dtype)
    metadata.update({"source_format": "saelens", "architecture": arch})
    _check_hooks(read, write, cfg_file)
    return Transcoder(**arrays, read_site=read, write_site=write, architecture=activation, jump="saelens",
                      metadata=metadata)


def _check_hooks(read: str, write: str, where: Path) -> None:
    """Both hooks name sites jfig can read and edit, or a FormatError naming the file."""
    try:
        input_site(read)
        output_site(write)
    except SiteError as e:
        raise FormatError(f"{where}: {e}") from e


TRANSCODER_FORMATS = ("auto", "saelens", "circuit_tracer")
CT_TRANSCODER_FILE = "transcoder.safetensors"


def save_transcoder(transcoder: Transcoder, path, *, format: str = "auto") -> Path:
    """Write a single-layer ``transcoder`` as a folder :func:`load_transcoders` reads back.

    ``format``: "saelens" writes a SAELens transcoder folder (``cfg.json`` with architecture
    ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` or ``jumprelu_skip_transcoder``,
    ``metadata.hook_name`` / ``hook_name_out`` and the transcoder's metadata; ``W_skip`` stored
    ``[d_out, d_in]``; ``sae_weights.safetensors``). SAELens has no TopK transcoder, so
    "circuit_tracer" writes a circuit-tracer ``transcoder_set`` (``config.yaml`` with ``activation``,
    ``k``, the hooks and a one-file ``transcoders`` list; ``transcoder.safetensors`` with ``W_enc``
    ``[d_tc, d_in]``, ``W_skip`` ``[d_out, d_in]`` and ``activation_function.threshold``), whose
    loader keeps only its own metadata (the rest is written under ``jfig_metadata`` for reference).
    "auto" (the default) picks SAELens for relu and jumprelu transcoders, circuit-tracer for topk and
    for a circuit-tracer-style JumpReLU with a threshold <= 0 (where the two conventions differ).

    The model's input norm of a transcoder reading ``ln2.hook_normalized`` is not written (it
    belongs to the model): ``load_transcoders(path, model=model)`` attaches it again. The folder is
    built beside ``path`` and renamed into place; an existing folder is replaced only if it holds
    nothing but transcoder files. A layer of a cross-layer transcoder is refused (see :func:`save_clt`).
    """
    if not isinstance(transcoder, Transcoder):
        raise JfigError(f"save_transcoder takes a jfig.saes.Transcoder, got {type(transcoder).__name__}")
    tc = transcoder
    if tc.later_sites:
        raise FormatError(f"save_transcoder: {tc.read_site} -> {tc.write_site} is one layer of a cross-layer "
                          f"transcoder; write the whole list with save_clt(transcoders, folder)")
    if format not in TRANSCODER_FORMATS:
        raise OptionError(f"save_transcoder: format {format!r} is unknown; expected one of {TRANSCODER_FORMATS}",
                          "format")
    ct_jump = tc.architecture == "jumprelu" and tc.jump == "circuit_tracer" and bool(np.any(np.asarray(tc.threshold) <= 0))
    if format == "auto":
        format = "circuit_tracer" if tc.architecture == "topk" or ct_jump else "saelens"
    elif format == "saelens" and (tc.architecture == "topk" or ct_jump):
        why = "SAELens has no TopK transcoder" if tc.architecture == "topk" else \
            "its circuit-tracer JumpReLU has thresholds <= 0, where SAELens's relu(pre) differs"
        raise FormatError(f"save_transcoder: {tc.read_site} -> {tc.write_site} cannot be written in SAELens's format: "
                          f"{why}; use format='circuit_tracer' (or 'auto')")
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FormatError(f"{path}: exists and is not a folder; save_transcoder writes a folder")
        extra = {p.name for p in path.iterdir()} - {CFG_FILE, WEIGHTS_FILE, CT_CONFIG_FILE, CT_TRANSCODER_FILE}
        if extra:
            raise FormatError(f"{path}: folder holds other files {sorted(extra)}; refusing to replace it")
    weights = {name: np.asarray(getattr(tc, name)) for name in ("b_enc", "W_dec", "b_dec")}
    if tc.W_skip is not None:
        weights["W_skip"] = np.ascontiguousarray(np.asarray(tc.W_skip).T)  # both formats: [d_out, d_in]
    metadata = {key: value for key, value in tc.meta.items() if key not in ("source_format", "architecture")}
    with atomic_folder(path) as tmp:
        if format == "saelens":
            weights["W_enc"] = np.asarray(tc.W_enc)
            if tc.threshold is not None:
                weights["threshold"] = np.asarray(tc.threshold)
            arch = ("jumprelu_" if tc.architecture == "jumprelu" else "") + \
                ("skip_transcoder" if tc.W_skip is not None else "transcoder")
            cfg = {"d_in": tc.d_in, "d_sae": tc.d_tc, "d_out": tc.d_out, "dtype": str(jnp.dtype(tc.W_enc.dtype)),
                   "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
                   "reshape_activations": "none", "architecture": arch,
                   "metadata": {**metadata, "hook_name": tc.read_site, "hook_name_out": tc.write_site,
                                "sae_lens_version": SAE_LENS_VERSION}}
            (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
            save_file(weights, str(tmp / WEIGHTS_FILE))
        else:
            weights["W_enc"] = np.ascontiguousarray(np.asarray(tc.W_enc).T)
            if tc.threshold is not None:
                weights["activation_function.threshold"] = np.asarray(tc.threshold)
            cfg = {"model_kind": "transcoder_set", "activation": tc.architecture,
                   "feature_input_hook": tc.read_site, "feature_output_hook": tc.write_site,
                   "transcoders": [CT_TRANSCODER_FILE]}
            if tc.k is not None:
                cfg["k"] = int(tc.k)
            if metadata.get("model_name"):
                cfg["model_name"] = metadata["model_name"]
            cfg["jfig_metadata"] = json.loads(json.dumps(metadata))
            (tmp / CT_CONFIG_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False))
            save_file(weights, str(tmp / CT_TRANSCODER_FILE))
    return path


def save_clt(transcoders, path) -> Path:
    """Write a cross-layer transcoder (the list :func:`jfig.train_clt` or :func:`load_transcoders`
    returns, one :class:`Transcoder` per layer 0..n-1) as a circuit-tracer CLT folder that
    :func:`load_transcoders` reads back with the same arrays, sites, architecture and ``k``.

    The folder holds ``config.yaml`` (``model_kind: cross_layer_transcoder``, ``activation``, ``k``
    for topk, ``feature_input_hook`` / ``feature_output_hook`` without the ``blocks.{i}.`` prefix,
    ``model_name`` when known, the first layer's metadata under ``jfig_metadata`` for reference) and
    for each layer i ``W_enc_{i}.safetensors`` (``W_enc_{i}`` ``[d_tc, d_in]``, ``b_enc_{i}``,
    ``b_dec_{i}``, the bias of layer i's output, and for jumprelu ``threshold_{i}``) and
    ``W_dec_{i}.safetensors`` (``W_dec_{i}`` ``[d_tc, n - i, d_out]``: layer i's own write, then each
    later layer's). Transcoder i must read ``blocks.i.<read hook>``, write ``blocks.i.<write hook>``
    and, through ``later_sites``, every later layer's write hook; one architecture, ``k``, ``d_tc``
    and widths throughout; no skip connection; a JumpReLU with positive thresholds or circuit-tracer's
    (which the folder's loader uses). The model's input norm is not written:
    ``load_transcoders(path, model=model)`` attaches it. The folder is built beside ``path`` and
    renamed into place; an existing folder is replaced only if it holds nothing but such files.
    """
    if isinstance(transcoders, Transcoder) or not all(isinstance(t, Transcoder) for t in transcoders) \
            or not transcoders:
        raise JfigError("save_clt takes a non-empty list of jfig.saes.Transcoder, one per layer")
    tcs = list(transcoders)
    n = len(tcs)
    first = tcs[0]
    read_local, write_local = first.read_site.split(".", 2)[-1], first.write_site.split(".", 2)[-1]
    for i, tc in enumerate(tcs):
        label = f"save_clt: transcoder {i} ({tc.read_site} -> {tc.write_site})"
        want_later = tuple(f"blocks.{j}.{write_local}" for j in range(i + 1, n))
        if (tc.read_site, tc.write_site) != (f"blocks.{i}.{read_local}", f"blocks.{i}.{write_local}") \
                or tuple(tc.later_sites) != want_later:
            raise FormatError(f"{label} writes {list(tc.out_sites)}; circuit-tracer's CLT format needs transcoder i "
                              f"to read blocks.i.{read_local} and write blocks.i.{write_local} and every later "
                              f"layer's (layers 0..{n - 1})")
        if (tc.architecture, tc.k, tc.d_tc, tc.d_in, tc.d_out) != \
                (first.architecture, first.k, first.d_tc, first.d_in, first.d_out):
            raise FormatError(f"{label}: architecture, k, d_tc and widths must be those of transcoder 0")
        if tc.W_skip is not None:
            raise FormatError(f"{label} has a skip connection; circuit-tracer's CLT format has none")
        if tc.architecture == "jumprelu" and tc.jump != "circuit_tracer" and bool(np.any(np.asarray(tc.threshold) <= 0)):
            raise FormatError(f"{label}: its SAELens-style JumpReLU has thresholds <= 0, where circuit-tracer's "
                              f"(pre above the threshold, no relu) differs")
    path = Path(path)
    names = {CT_CONFIG_FILE} | {f"{p}_{i}.safetensors" for p in ("W_enc", "W_dec") for i in range(n)}
    if path.exists():
        if not path.is_dir():
            raise FormatError(f"{path}: exists and is not a folder; save_clt writes a folder")
        extra = {p.name for p in path.iterdir()} - names
        if extra:
            raise FormatError(f"{path}: folder holds other files {sorted(extra)}; refusing to replace it")
    metadata = {key: value for key, value in first.meta.items() if key not in ("source_format", "architecture")}
    cfg = {"model_kind": "cross_layer_transcoder", "activation": first.architecture,
           "feature_input_hook": read_local, "feature_output_hook": write_local}
    if first.k is not None:
        cfg["k"] = int(first.k)
    if metadata.get("model_name"):
        cfg["model_name"] = metadata["model_name"]
    cfg["jfig_metadata"] = json.loads(json.dumps(metadata))
    with atomic_folder(path) as tmp:
        (tmp / CT_CONFIG_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False))
        for i, tc in enumerate(tcs):
            enc = {f"W_enc_{i}": np.ascontiguousarray(np.asarray(tc.W_enc).T), f"b_enc_{i}": np.asarray(tc.b_enc),
                   f"b_dec_{i}": np.asarray(tc.b_dec)}
            if tc.threshold is not None:
                enc[f"threshold_{i}"] = np.asarray(tc.threshold)
            W_dec = np.asarray(tc.W_dec)[:, None]
            if tc.W_dec_later is not None:
                W_dec = np.concatenate([W_dec, np.asarray(tc.W_dec_later)], axis=1)
            save_file(enc, str(tmp / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": np.ascontiguousarray(W_dec)}, str(tmp / f"W_dec_{i}.safetensors"))
    return path


def _ct_hook(hook, layer: int, cfg_file: Path, key: str) -> str:
    if not isinstance(hook, str) or not hook:
        raise FormatError(f"{cfg_file}: field {key!r} is {hook!r}; expected a hook name such as "
                          f"'ln2.hook_normalized' or 'hook_mlp_out'")
    return hook if hook.startswith("blocks.") else f"blocks.{layer}.{hook}"


def _load_ct_transcoders(folder: Path, dtype) -> list[Transcoder]:
    cfg_file = folder / CT_CONFIG_FILE
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FormatError(f"{cfg_file}: not valid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_file}: expected a mapping, got {type(cfg).__name__}")
    kind = cfg.get("model_kind", "transcoder_set")
    activation = cfg.get("activation")
    if activation not in (None, "relu", "jumprelu", "topk"):
        raise FormatError(f"{cfg_file}: field 'activation' is {activation!r}; expected 'relu', 'jumprelu', "
                          f"'topk' or absent")
    if kind == "cross_layer_transcoder":
        return _load_ct_clt(folder, cfg, cfg_file, activation, dtype or jnp.float32)
    if kind != "transcoder_set":
        raise FormatError(f"{cfg_file}: field 'model_kind' is {kind!r}; expected 'transcoder_set' or "
                          f"'cross_layer_transcoder'")
    listed = cfg.get("transcoders")
    if listed:
        files = []
        for entry in listed:
            if not isinstance(entry, str):
                raise FormatError(f"{cfg_file}: 'transcoders' entry {entry!r} is not a path; the older "
                                  f"[{{id, layer, filepath}}] layout is not supported")
            if entry.startswith(("hf://", "http://", "https://")):
                raise FormatError(f"{cfg_file}: transcoder {entry!r} is remote; jfig downloads nothing: fetch "
                                  f"the files and list local paths (or put layer_{{i}}.safetensors beside "
                                  f"{CT_CONFIG_FILE})")
            file = Path(entry) if Path(entry).is_absolute() else folder / entry
            if file.suffix != ".safetensors":
                raise FormatError(f"{cfg_file}: transcoder file {entry!r} is not a .safetensors file "
                                  f"(circuit-tracer npz transcoders are not supported yet)")
            files.append(file)
    else:
        files = _numbered(folder, "layer_")
    return [_load_ct_layer(file, layer, cfg, cfg_file, activation, dtype or jnp.float32)
            for layer, file in enumerate(files)]


def _numbered(folder: Path, prefix: str) -> list[Path]:
    """``{prefix}0.safetensors`` .. ``{prefix}{n-1}.safetensors`` in ``folder``, contiguous."""
    found = {}
    for file in folder.glob(f"{prefix}*.safetensors"):
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)\.safetensors", file.name)
        if m:
            found[int(m.group(1))] = file
    if not found:
        raise FormatError(f"{folder}: no {prefix}{{i}}.safetensors files beside {CT_CONFIG_FILE}")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise FormatError(f"{folder}: files must run {prefix}0 .. {prefix}{max(found)}; missing "
                          f"{prefix}{missing[0]}.safetensors")
    return [found[i] for i in range(len(found))]


def _load_ct_clt(folder: Path, cfg: dict, cfg_file: Path, activation, dtype) -> list[Transcoder]:
    """A circuit-tracer cross-layer transcoder: one Transcoder per read layer i, writing layers i..n-1."""
    enc_files = _numbered(folder, "W_enc_")
    n = len(enc_files)
    out = []
    for i, enc_file in enumerate(enc_files):
        dec_file = folder / f"W_dec_{i}.safetensors"
        enc = _read_safetensors(enc_file, required=(f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"))
        dec = _read_safetensors(dec_file, required=(f"W_dec_{i}",))
        tensors = {"W_enc": enc[f"W_enc_{i}"], "b_enc": enc[f"b_enc_{i}"], "b_dec": enc[f"b_dec_{i}"]}
        if f"threshold_{i}" in enc:
            tensors["activation_function.threshold"] = enc[f"threshold_{i}"]
        W_dec = dec[f"W_dec_{i}"]
        d_tc = tensors["W_enc"].shape[0] if tensors["W_enc"].ndim == 2 else None
        if W_dec.ndim != 3 or W_dec.shape[0] != d_tc or W_dec.shape[1] != n - i:
            raise FormatError(f"{dec_file}: tensor 'W_dec_{i}' has shape {list(W_dec.shape)}; expected "
                              f"[{d_tc}, {n - i}, d_model] (d_tc, the layers {i}..{n - 1} it writes, d_model)")
        tensors["W_dec"] = W_dec[:, 0]
        later = W_dec[:, 1:] if n - i > 1 else None
        out.append(_load_ct_layer(enc_file, i, cfg, cfg_file, activation, dtype, tensors=tensors, later=later,
                                  n_layers=n))
    return out


def _load_ct_layer(file: Path, layer: int, cfg: dict, cfg_file: Path, activation, dtype, *, tensors=None,
                   later=None, n_layers=None) -> Transcoder:
    """One per-layer transcoder (``tensors`` from ``file``, or given: a cross-layer transcoder's read
    layer, with ``later`` [d_tc, n_layers - layer - 1, d_model] its writes to the later layers)."""
    if tensors is None:
        tensors = _read_safetensors(file, required=("W_enc", "b_enc", "W_dec", "b_dec"))
    if tensors["W_enc"].ndim != 2:
        raise FormatError(f"{file}: tensor 'W_enc' has shape {list(tensors['W_enc'].shape)}; expected "
                          f"[d_tc, d_model]")
    d_tc, d_in = tensors["W_enc"].shape
    if tensors["W_dec"].ndim != 2 or tensors["W_dec"].shape[0] != d_tc:
        raise FormatError(f"{file}: tensor 'W_dec' has shape {list(tensors['W_dec'].shape)}; expected "
                          f"[{d_tc}, d_model]")
    d_out = tensors["W_dec"].shape[1]
    threshold = tensors.get("activation_function.threshold", tensors.get("threshold"))
    if activation is None:
        activation = "jumprelu" if threshold is not None else "relu"
    k = None
    if activation == "topk":
        k = cfg.get("k")
        if k is None and "k" in tensors:
            k = int(np.asarray(tensors["k"]).reshape(()))
        if not isinstance(k, int) or isinstance(k, bool):
            raise FormatError(f"{cfg_file}: a topk transcoder needs an int 'k' (in the config or as tensor 'k' "
                              f"in {file.name}); got {k!r}")
    if activation == "jumprelu":
        if threshold is None:
            raise FormatError(f"{file}: tensor 'activation_function.threshold' is missing; a jumprelu transcoder "
                              f"needs it ([{d_tc}])")
        threshold = np.asarray(threshold)
        if threshold.size == 1:
            threshold = np.broadcast_to(threshold.reshape(()), (d_tc,))
        elif threshold.size == d_tc:
            threshold = threshold.reshape(d_tc)
        else:
            raise FormatError(f"{file}: tensor 'activation_function.threshold' has shape {list(threshold.shape)}; "
                              f"expected [{d_tc}]")
    want = {"b_enc": (d_tc,), "b_dec": (d_out,)}
    if "W_skip" in tensors:
        want["W_skip"] = (d_out, d_in)
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise FormatError(f"{file}: tensor {name!r} has shape {list(tensors[name].shape)}; expected {list(shape)}")
    arrays = {"W_enc": np.asarray(tensors["W_enc"]).T, "b_enc": tensors["b_enc"], "W_dec": tensors["W_dec"],
              "b_dec": tensors["b_dec"]}
    if "W_skip" in tensors:
        arrays["W_skip"] = np.asarray(tensors["W_skip"]).T
    if activation == "jumprelu":
        arrays["threshold"] = threshold
    later_sites = ()
    if later is not None:
        arrays["W_dec_later"] = later
        later_sites = tuple(_ct_hook(cfg.get("feature_output_hook"), j, cfg_file, "feature_output_hook")
                            for j in range(layer + 1, n_layers))
    arrays = {name: jnp.asarray(np.asarray(a), dtype=dtype) for name, a in arrays.items()}
    read = _ct_hook(cfg.get("feature_input_hook"), layer, cfg_file, "feature_input_hook")
    write = _ct_hook(cfg.get("feature_output_hook"), layer, cfg_file, "feature_output_hook")
    _check_hooks(read, write, cfg_file)
    meta = {"source_format": "circuit_tracer", "layer": layer, "file": file.name}
    if n_layers is not None:
        meta["cross_layer"] = True
    if cfg.get("model_name"):
        meta["model_name"] = cfg["model_name"]
    return Transcoder(**arrays, read_site=read, write_site=write, architecture=activation, k=k,
                      jump="circuit_tracer", later_sites=later_sites, metadata=meta)
