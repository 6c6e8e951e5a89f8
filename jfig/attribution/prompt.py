"""A prompt as the token ids an attribution graph is computed on.

circuit-tracer's rule: a string is tokenised without special tokens; then, unless the first id is a
special token, one special token is put in front (position 0 is left out of the graph: its features
and error nodes are zeroed, so the first real token is not an outlier). The token put in front is the
first of BOS, PAD, EOS and the other special ids that is set and not 0 (circuit-tracer skips an id of
0 there, so a tokenizer whose BOS is 0 gets another special token in front).
"""
from __future__ import annotations

import numpy as np

from ..errors import JfigError


def special_ids(tok) -> list[int]:
    """The tokenizer's special ids in circuit-tracer's candidate order: BOS, PAD, EOS, then BOS, EOS,
    UNK, PAD (HF's special-token order); unset ones left out."""
    if tok is None:
        return []
    ids = [tok.bos_id, tok.pad_id, tok.eos_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id]
    return [int(i) for i in ids if i is not None]


def prompt_ids(model, prompt) -> np.ndarray:
    """int32 [s]: `prompt` (a string, or token ids [s] / [1, s]) with a special token in front as
    circuit-tracer puts it. Token ids are checked against the vocabulary; a model without a tokenizer
    takes token ids only and adds nothing in front."""
    tok = getattr(model, "tokenizer", None)
    if isinstance(prompt, str):
        if tok is None:
            raise JfigError("a text prompt needs a model with a tokenizer; pass token ids instead")
        if not prompt.strip():
            raise JfigError("the prompt is empty: give a prompt of at least one token")
        ids = np.asarray(tok.encode(prompt, add_bos=False), np.int64)
    else:
        ids = np.asarray(prompt)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.size == 0:
            raise JfigError("the prompt is empty: give a prompt of at least one token")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise JfigError(f"the prompt must be a string or integer token ids of shape [s] or [1, s]; got "
                            f"{ids.dtype} of shape {tuple(ids.shape)}")
    if ids.size == 0:
        raise JfigError("the prompt is empty: give a prompt of at least one token")
    vocab = model.vocab_size
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise JfigError(f"token ids must lie in [0, {vocab}); got {int(ids.min())} .. {int(ids.max())}")
    special = special_ids(tok)
    if special and int(ids[0]) not in special:
        first = next((i for i in special if i), None)
        if first is not None:
            ids = np.concatenate([[first], ids])
    return ids.astype(np.int32)
