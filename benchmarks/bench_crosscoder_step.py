"""Crosscoder training step on CPU or GPU: TopK decoding by gathering k decoder rows per token against
a dense matmul, and the interaction penalty's cost. Prints a table.

    python benchmarks/bench_crosscoder_step.py [--batch 1024] [--layers 4] [--d 576] [--latents 2048] [--k 64]

Rows: the loss and its gradient (`dictionary_loss` under `jax.value_and_grad`) at the stacked width
L * d with the gather decode (the SAE trainer's path) and the dense decode (the crosscoder's), both
with one dead latent so AuxK's branch runs; then a whole `crosscoder_train_step` without and with the
interaction penalty (readers of SmolLM2's shape: a gated MLP of 1,536 neurons per layer). Random
data of the same shapes; each row timed after compilation.
"""
from __future__ import annotations

import argparse
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from jfig.saes.train import CrosscoderConfig, dictionary_loss
from jfig.saes.train.step import crosscoder_train_step, init_crosscoder_state


def timeit(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--neurons", type=int, default=1536)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    width = a.layers * a.d
    x = jnp.asarray(rng.normal(size=(a.batch, a.layers, a.d)).astype(np.float32))
    cfg = CrosscoderConfig(d_sae=a.latents, architecture="topk", k=a.k, steps=10, batch_size=a.batch)
    W_enc = jnp.asarray(rng.normal(size=(width, a.latents)).astype(np.float32)) / np.sqrt(width)
    W_dec = W_enc.T
    flat = x.reshape(a.batch, width)
    dead = jnp.zeros(a.latents, bool).at[0].set(True)   # a dead latent: AuxK's branch runs too

    def loss(dense):                         # data passed as arguments: nothing for XLA to constant-fold
        def f(W, W_in, xs):
            return dictionary_loss(xs @ W_in, xs, W, jnp.zeros(width), None, dead, cfg, dense_decode=dense)[0]
        return jax.jit(jax.value_and_grad(f))

    rows = []
    for name, dense in (("gather decode (SAE path)", False), ("dense decode (crosscoder path)", True)):
        fn = loss(dense)
        rows.append((f"loss + gradient, {name}", timeit(lambda: fn(W_dec, W_enc, flat), a.reps)))
    state = init_crosscoder_state(cfg, a.layers, a.d, x)
    readers = jnp.asarray(rng.normal(size=(a.layers, a.d, a.neurons, 2)).astype(np.float32))
    readers = readers / jnp.linalg.norm(readers, axis=1, keepdims=True)
    rows.append(("crosscoder_train_step", timeit(lambda: crosscoder_train_step(state, x)[1]["loss"], a.reps)))
    pen = init_crosscoder_state(CrosscoderConfig(**{**cfg.__dict__, "interaction_penalty": 0.1}), a.layers, a.d, x)
    rows.append(("crosscoder_train_step with the penalty",
                 timeit(lambda: crosscoder_train_step(pen, x, readers)[1]["loss"], a.reps)))
    print(f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}; batch {a.batch}, "
          f"{a.layers} x {a.d} stacked, {a.latents} latents, k {a.k}")
    print("| what | seconds |\n|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} |")
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
