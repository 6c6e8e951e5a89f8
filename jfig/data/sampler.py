"""Text sampling from built-in models, and sampled text as a corpus.

`sample` is a thin list-in, list-out front end to `Model.generate` (the one forward with a
key/value cache, jfig.models.generate); `sampled_corpus` caches sampled documents on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import JfigError, ShapeError
from .corpus import Corpus


def sample(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 0) -> list[list[int]]:
    """The `max_new_tokens` new tokens after each prompt (ragged prompts are fine).

    temperature=0 is greedy decoding; top_k keeps the k likeliest tokens before sampling.
    Deterministic given `seed`. Needs a built-in model (one with a config).
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ShapeError("sample needs at least one prompt, each with at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    out = model.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return np.asarray(out)[:, -max_new_tokens:].tolist()


# ---------------------------------------------------------------------- sampled text as corpus
def cache_root() -> Path:
    """jfig's cache folder: $XDG_CACHE_HOME/jfig (default ~/.cache/jfig)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jfig"


def _model_fingerprint(model) -> str:
    h = hashlib.sha256(repr(model.config).encode())
    h.update(np.asarray(model.params["embed"][:8], np.float32).tobytes())
    return h.hexdigest()


def sampled_corpus(model, n_docs: int, length: int = 128, seed: int = 0, *, temperature: float = 1.0,
                   top_k: int | None = 50, batch_size: int = 8):
    """A Corpus of `n_docs` texts sampled from `model` (each up to `length` tokens after BOS,
    cut at EOS). Generated on first read and cached as JSONL under
    $XDG_CACHE_HOME/jfig/samples/, keyed by the model and these settings."""
    tok = model.tokenizer
    if tok is None:
        raise JfigError("sampled_corpus needs a model with a tokenizer to decode its samples")
    settings = dict(n_docs=n_docs, length=length, seed=seed, temperature=temperature, top_k=top_k,
                    batch_size=batch_size, model=_model_fingerprint(model))
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (model.config.name or "model"))
    path = cache_root() / "samples" / f"{name}-{key}.jsonl"

    def docs() -> Iterator[str]:
        if not path.exists():
            _write_samples(model, path, n_docs, length, seed, temperature, top_k, batch_size)
        return iter(Corpus.from_jsonl(path))

    return Corpus(docs, f"{n_docs} samples from {model.config.name or 'model'}")


def _write_samples(model, path: Path, n_docs, length, seed, temperature, top_k, batch_size):
    tok = model.tokenizer
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if start is None:
        raise JfigError("sampled_corpus needs a BOS or EOS token to start generation from")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(0, n_docs, batch_size):
            rows = sample(model, [[start]] * min(batch_size, n_docs - i), length, temperature=temperature,
                          top_k=top_k, seed=seed * 1_000_003 + i)
            for ids in rows:
                if tok.eos_id is not None and tok.eos_id in ids:
                    ids = ids[:ids.index(tok.eos_id)]
                f.write(json.dumps({"text": tok.decode(ids, skip_special=True)}) + "\n")
    os.replace(tmp, path)
