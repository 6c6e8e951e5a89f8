"""Data: text corpora, packing into token batches, behaviour prompt suites, sampling, activations."""
from .activations import ActivationBuffer, collect_activations, stream_activations
from .corpus import (Corpus, as_corpus, corpus_hash, looks_like_tokens, offline_corpus, pack, prompt_corpus, pydoc_corpus, token_batches,
                     tokenizer_fingerprint, tokens_from)
from .defaults import default_corpus
from .prompts import BEHAVIORS, Prompt, all_prompts, induction_tokens, prompt_suite
from .sampler import sample, sampled_corpus

__all__ = [
    "ActivationBuffer", "BEHAVIORS", "Corpus", "Prompt", "all_prompts", "as_corpus", "collect_activations",
    "corpus_hash", "default_corpus", "induction_tokens", "looks_like_tokens", "offline_corpus", "pack", "prompt_corpus", "prompt_suite", "pydoc_corpus",
    "sample", "sampled_corpus", "stream_activations", "token_batches", "tokenizer_fingerprint", "tokens_from",
]
