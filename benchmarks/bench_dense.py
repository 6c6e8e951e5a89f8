"""Dense graphs (`targets="all"`) on SmolLM2-135M: memory as the number of pairs grows, and one large
graph end to end.

    python benchmarks/bench_dense.py memory [--sources 32 128 512]
    python benchmarks/bench_dense.py large  [--sources-per-site 667]

memory: one dense build per size, each in a fresh process (peak resident memory is per process),
on the default SAEs (blocks.{6,10,14,18}, d_sae 2048) and 128 x 64 tokens of the default corpus.
Every source is measured against all 2,048 features of the next site, so pairs = 2,048 x sources.
Reported: pairs, edges, peak RSS per stage (sampled every 20 ms; the stage lines of the build's
log close each stage), the build folder's block bytes, and what the measured records would take
held in memory at once (the candidate build's concatenation, 80 bytes a pair).

large: a graph over 3 x 667 = 2,001 source features against every feature at the later sites of 4
SAE sites in a 5-layer window (blocks.{9,10,11,12}; default-recipe SAEs trained and cached on first
use), 256 sequences of 64 tokens, 32 inputs per source, gating on; prints the stage times.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

import jfig
from jfig.data import default_corpus
from jfig.pipeline import build_graph
from jfig.saes import default_saes

MEMORY_OPTIONS = dict(seq_len=64, max_sequences=128, targets="all", inputs_per_source=32, block_size=8,
                      read="pre", importance="rate", gating=False, batch_size=16)
LARGE_SITES = tuple(f"blocks.{l}.hook_resid_post" for l in (9, 10, 11, 12))
RECORD_BYTES = 80          # a measured pair held in memory: 4 ids/sites + 6 float64 statistics


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class StagePeaks(logging.Handler):
    """Peak resident memory per build stage: a thread samples RSS every 20 ms, and each stage line the
    build logs ("... in N s") closes the stage it names."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.peaks, self.current, self.stop = {}, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while not self.stop.is_set():
            self.current = max(self.current, rss_mb())
            time.sleep(0.02)

    def emit(self, record):
        msg = record.getMessage()
        for stage in ("atlas and", "measurement in", "significance, gating and graph in"):
            if msg.startswith(stage):
                self.peaks[stage.split(" in")[0].replace("atlas and", "atlas + candidates")] = round(
                    max(self.current, rss_mb()))
                self.current = rss_mb()


def one_size(sources: int, out: str) -> dict:
    """A dense build with `sources` sources spread over the three source sites (in this process)."""
    model = jfig.load_model("smollm2-135m")
    saes, _ = default_saes(model, progress=False)
    per_site = -(-sources // 3)
    peaks = StagePeaks()
    build_log = logging.getLogger("jfig.pipeline.build")
    build_log.setLevel(logging.INFO)
    build_log.addHandler(peaks)
    t = time.perf_counter()
    g = build_graph(model, saes, default_corpus(model), out_dir=out, progress=False, top_k=per_site,
                    max_sources=sources, **MEMORY_OPTIONS)
    wall = time.perf_counter() - t
    peaks.stop.set()
    st = g.manifest["statistics"]
    block_bytes = sum(p.stat().st_size for p in Path(out, "blocks").glob("*.npz"))
    return dict(sources=sources, pairs=st["n_tested"], edges=g.n_edges, seconds=round(wall, 1),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                stage_peak_mb=peaks.peaks, block_mb=round(block_bytes / 1e6, 1),
                held_records_mb=round(st["n_tested"] * RECORD_BYTES / 1e6, 1))


def memory(sizes):
    rows = []
    for n in sizes:
        out = tempfile.mkdtemp(prefix="jfig-dense-")
        try:
            res = subprocess.run([sys.executable, __file__, "_one", str(n), out], capture_output=True, text=True,
                                 check=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"backend {jax.default_backend()}")
    print("| sources | pairs tested | edges | build s | peak RSS: atlas + candidates | measurement + streamed "
          "significance | gating + graph | block files | records held at once |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pk = r["stage_peak_mb"]
        print(f"| {r['sources']:,} | {r['pairs']:,} | {r['edges']:,} | {r['seconds']} | "
              f"{pk.get('atlas + candidates', 0):,} MB | {pk.get('measurement', 0):,} MB | "
              f"{pk.get('significance, gating and graph', 0):,} MB | {r['block_mb']} MB | {r['held_records_mb']} MB |")


def large(per_site: int, out: str):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = jfig.load_model("smollm2-135m")
    t = time.perf_counter()
    saes, _ = default_saes(model, sites=LARGE_SITES, progress=False)
    print(f"SAEs at {LARGE_SITES} ready in {time.perf_counter() - t:.0f} s", flush=True)
    peaks = StagePeaks()
    logging.getLogger("jfig.pipeline.build").addHandler(peaks)
    t = time.perf_counter()
    g = build_graph(model, saes, default_corpus(model), out_dir=out, progress=True, seq_len=64, max_sequences=256,
                    targets="all", top_k=per_site, inputs_per_source=32, block_size=16, read="pre",
                    importance="attribution", importance_sequences=8, batch_size=16)
    wall = time.perf_counter() - t
    st = g.manifest["statistics"]
    n_sources = len(set(zip(g.edges.column("source_site").to_pylist(), g.edges.column("source").to_pylist())))
    print(g.summary())
    print(f"\n{per_site} sources per site x every target feature at the later sites of {len(LARGE_SITES)} sites "
          f"(window 5): {st['n_tested']:,} pairs tested, {g.n_edges:,} edges ({n_sources:,} sources with an edge), "
          f"build {wall / 60:.1f} min; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB "
          f"(by stage: {peaks.peaks}); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        print(json.dumps(one_size(int(sys.argv[2]), sys.argv[3])))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("memory", "large"))
    ap.add_argument("--sources", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--sources-per-site", type=int, default=667)
    ap.add_argument("--out", default=None, help="large: the build folder (default: a temporary one, removed)")
    a = ap.parse_args()
    if a.what == "memory":
        memory(a.sources)
        return
    out = a.out or tempfile.mkdtemp(prefix="jfig-large-")
    try:
        large(a.sources_per_site, out)
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
