"""How a clamp sweep's time grows with sources, inputs, targets and sequence length, with the
position-sparse suffix (the default) and the full suffix.

    python benchmarks/bench_scaling.py [--quick]

SmolLM2-135M, random TopK SAEs (d_sae 2048, k 32) at blocks.6 (sources) and blocks.10 (targets),
random tokens, the clean prefix shared (as a build does; its one-off time is reported apart).
Each point is timed on its second call (compiled), so it is the steady-state cost of the sweep.
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import jfig
from jfig.measure import clean_prefix

SRC, TGT = "blocks.6.hook_resid_post", "blocks.10.hook_resid_post"


def timed(fn):
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer points")
    a = ap.parse_args()
    model = jfig.load_model("smollm2-135m")
    cfg = model.config
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), cfg.d_model, 2048, s, "topk", k=32)
            for i, s in enumerate((SRC, TGT))]
    base = dict(sources=32, inputs=16, targets=2048, seq=64)
    grid = {"sources": [8, 32, 128], "inputs": [8, 16, 32], "targets": [64, 2048], "seq": [32, 64, 128]}
    if a.quick:
        grid = {"sources": [8, 32], "seq": [32, 64]}
    rng = np.random.default_rng(0)
    tokens = {s: rng.integers(0, cfg.vocab_size, (64, s)) for s in sorted({base["seq"], *grid.get("seq", [])})}
    cleans = {}
    for s, toks in tokens.items():
        t = time.perf_counter()
        cleans[s] = clean_prefix(model, toks, (SRC, TGT), batch_size=16)
        jax.block_until_ready(cleans[s].kv.k)
        print(f"clean prefix, 64 sequences x {s} tokens, every layer: {time.perf_counter() - t:.2f} s "
              f"(includes compilation), {cleans[s].nbytes / 1e6:.0f} MB")
    rows = []
    for axis, values in grid.items():
        for v in values:
            p = {**base, axis: v}
            srcs = {SRC: list(range(p["sources"]))}
            tg = {TGT: list(range(p["targets"]))}
            for sparse in (True, False):
                kw = dict(targets=tg, inputs_per_source=p["inputs"], progress=False, sparse=sparse, read="pre",
                          clean=cleans[p["seq"]])
                sec = timed(lambda: jfig.measure_effects(model, saes, srcs, tokens[p["seq"]], **kw))
                rows.append((axis, v, "sparse" if sparse else "full", sec, p["sources"] * p["inputs"] / sec))
                print(f"{axis}={v:<5d} {rows[-1][2]:6s} {sec:8.3f} s  {rows[-1][4]:9.1f} source x input / s",
                      flush=True)
    print(f"\nmachine: {platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; base point "
          f"{base}")
    print("| varied | value | suffix | seconds | source × input / s |")
    print("|---|---|---|---|---|")
    for axis, v, kind, sec, rate in rows:
        print(f"| {axis} | {v} | {kind} | {sec:.3f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
