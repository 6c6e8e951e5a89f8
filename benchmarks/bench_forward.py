"""Forward-pass and clamp-sweep throughput of the default model. Prints a table.

    python benchmarks/bench_forward.py [--batch 8] [--seq 64] [--reps 5] [--model M | --random-weights]

Rows: a full forward (logits), a forward stopped at a site, and a vmapped clamp sweep on a
cached prefix (suffix from layer 8 to layer 12), each timed after compilation. `--random-weights`
times a random-weight model of the same shape (benchmarks/random_checkpoint.py) where the GGUF file
is not installed.
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jfig
from random_checkpoint import add_model_args, describe, model_arg


def timeit(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sources", type=int, default=32)
    add_model_args(ap)
    a = ap.parse_args()
    name = model_arg(a)
    model = jfig.load_model(name)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (a.batch, a.seq)), jnp.int32)
    src, tgt = "blocks.8.hook_resid_post", "blocks.12.hook_resid_post"
    sae = jfig.SAE.init_random(jax.random.PRNGKey(0), model.config.d_model, 4096, src, "topk", k=32)
    pre = model.prefix(tokens, src)

    @jax.jit
    def sweep(prefix_acts, feats):
        p = jfig.Prefix(src, prefix_acts, None)

        def one(f):
            return model.run_suffix(p, edits=(jfig.Clamp(sae, f, 5.0),), stop_at=tgt, capture=(tgt,)).cache[tgt]
        return jax.vmap(one)(feats)

    feats = jnp.arange(a.sources)
    rows = [
        ("forward, logits", timeit(lambda: model.run(tokens).logits, a.reps), a.batch * a.seq, "tokens"),
        ("forward, stop at layer 12", timeit(lambda: model.run(tokens, stop_at=tgt, capture=(tgt,)).cache[tgt], a.reps),
         a.batch * a.seq, "tokens"),
        (f"clamp sweep L8->L12, {a.sources} sources", timeit(lambda: sweep(pre.acts, feats), a.reps),
         a.sources * a.batch, "source x input"),
    ]
    print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}; batch {a.batch}, seq {a.seq}; model {describe(name)}")
    print(f"{'what':40s} {'seconds':>9s} {'rate':>14s}")
    for name, sec, n, unit in rows:
        print(f"{name:40s} {sec:9.4f} {n / sec:10.1f} {unit}/s")


if __name__ == "__main__":
    main()
