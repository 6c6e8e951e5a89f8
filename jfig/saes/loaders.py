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
from safetensors import safe_open
from safetensors.numpy import save_file

from jfig.errors import FormatError, OptionError
from jfig.models.hub_cache import DEFAULT_REVISION
from jfig.saes.registry import GEMMA_SCOPE_FORMAT, locate_sae
from jfig.saes.sae import SAE, fold_activation_norm_scaling_factor

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
SAE_LENS_VERSION = "6.0.0"

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
_UNSUPPORTED = {
    "gated": "gated SAEs are not supported yet",
    "transcoder": "transcoders are not supported yet",
    "skip_transcoder": "skip transcoders are not supported yet",
    "jumprelu_transcoder": "JumpReLU transcoders are not supported yet",
}
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
