"""Co-activation atlas throughput on the default model. Prints a table.

    python benchmarks/bench_atlas.py [--batch 8] [--seq 128] [--batches 4] [--methods sparse,dense]
                                     [--model M | --random-weights]

Three random TopK SAEs (d_sae 4096, k 32) at residual sites of layers 8, 10 and 12 (all six site
pairs inside the default window of 5 layers, every feature tracked). Rows: the bare forward pass
plus SAE encoding (what any atlas must pay), then one row per pair-counting method: tokens/s of
the whole jitted atlas step (forward, encode, per-feature statistics, top contexts and pair
counts), timed after compilation. `--random-weights` times a random-weight model of the same shape
(benchmarks/random_checkpoint.py) where the GGUF file is not installed.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jfig
from jfig.atlas import AtlasAccumulator
from random_checkpoint import add_model_args, describe, model_arg

SITES = ("blocks.8.hook_resid_post", "blocks.10.hook_resid_post", "blocks.12.hook_resid_post")


@partial(jax.jit, static_argnames=("sites",))
def forward_encode(model, saes, tokens, *, sites):
    out = model.run(tokens, capture=sites, stop_at=sites[-1], logits=False)
    return [sae.encode(out.cache[s]) for sae, s in zip(saes, sites)]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4, help="timed batches per row")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--methods", default="sparse,dense")
    add_model_args(ap)
    a = ap.parse_args()
    name = model_arg(a)
    model = jfig.load_model(name)
    saes = tuple(jfig.SAE.init_random(jax.random.PRNGKey(i), model.config.d_model, a.d_sae, s, "topk", k=a.k)
                 for i, s in enumerate(SITES))
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, model.config.vocab_size, (a.batch, a.seq)), jnp.int32)
               for _ in range(a.batches + 1)]
    n_tok = a.batch * a.seq

    rows = []
    jax.block_until_ready(forward_encode(model, saes, batches[0], sites=SITES))
    t = time.perf_counter()
    for b in batches[1:]:
        jax.block_until_ready(forward_encode(model, saes, b, sites=SITES))
    rows.append(("forward + encode (reference)", (time.perf_counter() - t) / a.batches, "-"))
    for method in a.methods.split(","):
        acc = AtlasAccumulator({s: a.d_sae for s in SITES}, window=5, method=method,
                               max_active={s: a.k for s in SITES})
        t0 = time.perf_counter()
        acc.update_from_model(model, saes, batches[0])
        jax.block_until_ready(acc.state)
        compile_s = time.perf_counter() - t0
        t = time.perf_counter()
        for b in batches[1:]:
            acc.update_from_model(model, saes, b)
        jax.block_until_ready(acc.state)
        rows.append((f"atlas step, method={method} (compile {compile_s:.1f} s)", (time.perf_counter() - t) / a.batches,
                     f"{acc.nbytes() / 2**20:.0f}"))
        print(f"{rows[-1][0]}: {rows[-1][1]:.3f} s/batch", flush=True)

    print(f"machine: {cpu_name()} ({os.cpu_count()} cores), {jax.devices()[0].device_kind} "
          f"({jax.device_count()} device, {jax.default_backend()}), jax {jax.__version__}")
    print(f"settings: {describe(name)}, sites {', '.join(SITES)}; TopK SAEs d_sae {a.d_sae}, k {a.k}; "
          f"batch {a.batch} x seq {a.seq} = {n_tok} tokens; window 5 (6 site pairs), position_window 0; "
          f"{a.batches} timed batches")
    print(f"{'what':52s} {'s/batch':>9s} {'tokens/s':>10s} {'state MiB':>10s}")
    for name, sec, mib in rows:
        print(f"{name:52s} {sec:9.3f} {n_tok / sec:10.0f} {mib:>10s}")


if __name__ == "__main__":
    main()
