"""The offline default corpus: CPython's bundled docs, the prompt suites, and optionally text
sampled from the model itself. Nothing is downloaded."""
from __future__ import annotations

from ..errors import JfigError
from .corpus import Corpus, offline_corpus
from .sampler import sampled_corpus


def default_corpus(model=None, *, docs: bool = True, prompts: bool = True, n_samples: int = 0,
                   sample_length: int = 128, seed: int = 0) -> Corpus:
    """The offline default: CPython's docs + the prompt suites + (n_samples > 0) text sampled
    from `model` (cached on disk; see sampler.sampled_corpus). Nothing is downloaded."""
    parts = [offline_corpus(docs=docs, prompts=prompts, seed=seed)] if docs or prompts else []
    if n_samples:
        if model is None:
            raise JfigError("default_corpus(n_samples > 0) samples text from a model: pass model=")
        parts.append(sampled_corpus(model, n_samples, sample_length, seed=seed))
    if not parts:
        raise JfigError("default_corpus with docs, prompts and samples all off has no documents")
    return Corpus.concat(parts)
