"""The behaviour metric: logit difference between the answer and the distractor at the last prompt
token, under any edits; and the model's baseline on a suite.

`logit_diff(model, tokens, last, answer, distractor, edits)` is a pure JAX function of the edits'
leaves, so it composes with `jax.grad` (attribution patching) and `jax.vmap` (many feature sets in
one pass). Built-in models unembed only the last prompt position of each row; models wrapped with
`Model.from_function` return full logits and are read at the same position.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..models.forward import unembed
from ..models.layers import norm
from ..sites import block_site
from .suite import SuiteTokens


def final_site(model) -> str:
    """The site whose activations the unembedding reads (built-in models)."""
    return block_site(model.config.n_layers - 1, "hook_resid_post")


def answer_logits(cfg, params, x, ids) -> jax.Array:
    """Logits [b] of the tokens `ids` [b] from final residuals x [b, d], as the unembedding computes them
    (final norm, the ids' unembedding columns only, soft-cap)."""
    h = norm(cfg, x, params["ln_f_w"], params.get("ln_f_b"))
    cols = params["unembed"][:, ids].T if "unembed" in params else params["embed"][ids]      # [b, d]
    logit = jnp.sum(h * cols.astype(h.dtype), axis=-1)
    if cfg.final_softcap is not None:
        logit = jnp.tanh(logit / cfg.final_softcap) * cfg.final_softcap
    return logit


def residual_logit_diff(cfg, params, x_last, answer, distractor) -> jax.Array:
    """[b]: logit(answer) - logit(distractor) from the final residuals at the metric positions x_last [b, d]."""
    return answer_logits(cfg, params, x_last, answer) - answer_logits(cfg, params, x_last, distractor)


def last_logits(model, tokens, last, edits=()) -> jax.Array:
    """Logits [n, vocab] at position last[row] of each row of tokens [n, w] under `edits`."""
    rows = jnp.arange(tokens.shape[0])
    if model.config is None:
        return model.run(tokens, edits=edits).logits[rows, last]
    site = final_site(model)
    x = model.run(tokens, edits=edits, capture=(site,), logits=False).cache[site]   # [n, w, d]
    return unembed(model.config, model.params, x[rows, last][:, None])[:, 0]


def logit_diff(model, tokens, last, answer, distractor, edits=()) -> jax.Array:
    """[n]: logit(answer) - logit(distractor) at each row's last prompt token (built-in models unembed
    only the two tokens' columns)."""
    rows = jnp.arange(tokens.shape[0])
    if model.config is None:
        logits = model.run(tokens, edits=edits).logits[rows, last]
        return logits[rows, answer] - logits[rows, distractor]
    site = final_site(model)
    x = model.run(tokens, edits=edits, capture=(site,), logits=False).cache[site]   # [n, w, d]
    return residual_logit_diff(model.config, model.params, x[rows, last], answer, distractor)


class Baseline(NamedTuple):
    """The unedited model on a suite: accuracy = fraction of prompts whose answer outscores the
    distractor; top1 = fraction whose answer is the most likely next token; p_answer = mean
    probability of the answer's first token; logit_diff = mean logit difference (and on the
    corrupted prompts, when the suite has them)."""

    n: int
    accuracy: float
    top1: float
    p_answer: float
    logit_diff: float
    corrupted_logit_diff: float | None

    def as_dict(self) -> dict:
        return self._asdict()


def suite_baseline(model, batch: SuiteTokens, *, batch_size: int = 16) -> Baseline:
    """The model's baseline on a tokenised suite (no edits)."""
    diffs, top1, p_ans, cdiffs = [], [], [], []
    for lo in range(0, len(batch.tokens), batch_size):
        sl = slice(lo, lo + batch_size)
        logits = last_logits(model, jnp.asarray(batch.tokens[sl]), jnp.asarray(batch.last[sl]))
        rows = np.arange(logits.shape[0])
        lg = np.asarray(logits, np.float64)
        diffs.append(lg[rows, batch.answer[sl]] - lg[rows, batch.distractor[sl]])
        top1.append(lg.argmax(-1) == batch.answer[sl])
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p_ans.append(p[rows, batch.answer[sl]] / p.sum(-1))
        if batch.corrupted is not None:
            c = logit_diff(model, jnp.asarray(batch.corrupted[sl]), jnp.asarray(batch.corrupted_last[sl]), jnp.asarray(batch.answer[sl]),
                           jnp.asarray(batch.distractor[sl]))
            cdiffs.append(np.asarray(c, np.float64))
    d = np.concatenate(diffs)
    return Baseline(n=len(d), accuracy=float((d > 0).mean()), top1=float(np.concatenate(top1).mean()),
                    p_answer=float(np.concatenate(p_ans).mean()), logit_diff=float(d.mean()),
                    corrupted_logit_diff=float(np.concatenate(cdiffs).mean()) if cdiffs else None)

