"""Speed-up of a clamp sweep sharded over several local devices (the source axis), against one device.

    python benchmarks/bench_devices.py [--devices 1 2 4] [--sources 32] [--inputs 16] [--model M | --random-weights]

Each device count runs in its own process: on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N
splits the host into N devices (they share its cores, so the speed-up is bounded by the core count);
on a machine with N accelerators, the real devices are used. SmolLM2-135M, random TopK SAEs at
blocks.6 (sources) and blocks.10 (targets), 64 random sequences of 64 tokens, clean prefix shared;
the second (compiled) call is timed, and every run's effects are checked equal to the first's.
`--random-weights` uses a random-weight model of the same shape (benchmarks/random_checkpoint.py)
where the GGUF file is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from random_checkpoint import add_model_args, describe, model_arg

CHILD = r"""
import json, sys, time
import jax, numpy as np
import jfig
from jfig.measure import clean_prefix
n_dev, n_src, n_in = (int(x) for x in sys.argv[1:4])
model = jfig.load_model(sys.argv[5])
cfg = model.config
src, tgt = "blocks.6.hook_resid_post", "blocks.10.hook_resid_post"
saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), cfg.d_model, 2048, s, "topk", k=32) for i, s in enumerate((src, tgt))]
toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (64, 64))
clean = clean_prefix(model, toks, (src, tgt))
kw = dict(inputs_per_source=n_in, progress=False, devices=n_dev, clean=clean, read="pre", chunk_size=n_src)
run = lambda: jfig.measure_effects(model, saes, {src: list(range(n_src))}, toks, **kw)
run()
t = time.perf_counter()
eff = run()
sec = time.perf_counter() - t
np.save(sys.argv[4], eff.mean)
print(json.dumps({"devices": n_dev, "available": len(jax.local_devices()), "kind": jax.devices()[0].device_kind,
                  "seconds": sec}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sources", type=int, default=32)
    ap.add_argument("--inputs", type=int, default=16)
    add_model_args(ap)
    a = ap.parse_args()
    name = model_arg(a)
    import numpy as np
    rows, first = [], None
    for n in a.devices:
        env = dict(os.environ)
        if "cuda" not in env.get("JAX_PLATFORMS", "") and "tpu" not in env.get("JAX_PLATFORMS", ""):
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={max(a.devices)}"
        out = f"/tmp/bench_devices_{n}.npy"
        res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(a.sources), str(a.inputs), out, name],
                             env=env, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"the {n}-device run failed:\n{res.stderr[-4000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        mean = np.load(out)
        first = mean if first is None else first
        r["max_diff"] = float(np.nanmax(np.abs(mean - first)))
        rows.append(r)
        print(r, flush=True)
    base = rows[0]["seconds"]
    print(f"\n{a.sources} sources x {a.inputs} inputs, {rows[0]['kind']}, {rows[0]['available']} devices visible; "
          f"model {describe(name)}")
    print("| devices | seconds | speed-up | max |difference| to 1 device |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['seconds']:.3f} | {base / r['seconds']:.2f}× | {r['max_diff']:.1e} |")


if __name__ == "__main__":
    main()
