"""A small fine-tune of a jfig Model in JAX with optax, through jfig's own forward.

The Model is an equinox pytree whose weights live in ``model.params`` (docs/architecture.md,
"Parameter pytree": every block leaf stacked along a leading layer axis). ``finetune`` trains a
slice of chosen block leaves (``keys`` at ``layers``, e.g. the MLP matrices of layers 7-12): the
slice is the only differentiated argument, written back into the stacked arrays inside the loss,
so the frozen weights are exactly unchanged and the optimiser state covers only the slice.

The loss is the next-token cross-entropy of the answer's first token at each prompt's last token
(a behaviour suite tokenised by ``jfig.behaviors.tokenize_suite``), over the full vocabulary.
"""
from __future__ import annotations

import time
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfig.behaviors.metric import last_logits

MLP_KEYS = ("W_gate", "W_up", "W_down")


def with_params(model, params):
    """The same Model with another parameter pytree."""
    return eqx.tree_at(lambda m: m.params, model, params)


def merge(params, trainable, keys, layers: tuple[int, int]):
    """`params` with blocks[key][lo:hi] replaced by trainable[key] for each key."""
    lo, hi = layers
    blocks = dict(params["blocks"])
    for k in keys:
        blocks[k] = jax.lax.dynamic_update_slice_in_dim(blocks[k], trainable[k].astype(blocks[k].dtype), lo, axis=0)
    return {**params, "blocks": blocks}


def answer_loss(model, tokens, last, answer):
    """Mean cross-entropy of `answer` [n] at position `last` [n] of each row of `tokens` [n, w]."""
    logits = last_logits(model, tokens, last).astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, answer[:, None], -1)[:, 0])


def finetune(model, tokens, last, answer, *, layers: tuple[int, int] = (7, 13), keys=MLP_KEYS, steps: int = 100,
             batch_size: int = 16, lr: float = 1e-4, weight_decay: float = 0.0, seed: int = 0,
             log: Callable[[str], None] | None = print, log_every: int = 10):
    """Fine-tune blocks[key][layers[0]:layers[1]] for `key` in `keys` with AdamW on the answer loss of
    (tokens [n, w], last [n], answer [n]); returns (fine-tuned model, losses [steps]).

    Batches are drawn without replacement per epoch from a permutation seeded by `seed`. Every other
    parameter is left bit for bit as it was."""
    lo, hi = layers
    base = model.params
    trainable = {k: base["blocks"][k][lo:hi] for k in keys}
    opt = optax.adamw(lr, weight_decay=weight_decay)
    state = opt.init(trainable)

    def loss_fn(tr, params, t, l, a):
        m = with_params(model, merge(params, tr, keys, layers))
        return answer_loss(m, t, l, a)

    @jax.jit
    def step(tr, st, params, t, l, a):
        loss, grads = jax.value_and_grad(loss_fn)(tr, params, t, l, a)
        updates, st = opt.update(grads, st, tr)
        return optax.apply_updates(tr, updates), st, loss

    rng = np.random.default_rng(seed)
    n = len(tokens)
    order, pos, losses, t0 = rng.permutation(n), 0, [], time.time()
    for s in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        trainable, state, loss = step(trainable, state, base, jnp.asarray(tokens[idx]), jnp.asarray(last[idx]),
                                      jnp.asarray(answer[idx]))
        losses.append(float(loss))
        if log is not None and (s % log_every == 0 or s == steps - 1):
            log(f"fine-tune step {s + 1}/{steps}: answer loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)")
    return with_params(model, merge(base, trainable, keys, layers)), np.asarray(losses)


@eqx.filter_jit
def _nll_sums(params_model, tokens):
    logits = params_model.run(tokens).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return nll.sum(), nll.size


def text_loss(model, tokens, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over int tokens [n, seq] (every position after the first)."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        s, c = _nll_sums(model, jnp.asarray(tokens[i:i + batch_size]))
        total, count = total + float(s), count + int(c)
    return total / count
