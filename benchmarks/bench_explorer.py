"""The explorer page at 100,000 edges in headless Chromium: payload build, page load, first render,
full and interaction renders (with and without rasterisation), filter change, zoom, pan, click-select.

    python benchmarks/bench_explorer.py [--out timings.json]

It runs the scale test of tests/explorer/test_page_browser.py (one measurement, no duplicate code) with
JFIG_EXPLORER_TIMINGS set, and prints its figures as a Markdown table for docs/explorer.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/explorer/test_page_browser.py::test_scale_100k_edges"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the timings here as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "timings.json"
        env = dict(os.environ, JFIG_EXPLORER_TIMINGS=str(file))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", TEST], cwd=ROOT, env=env)
        if proc.returncode != 0 or not file.exists():
            sys.exit(f"the scale test did not run (exit {proc.returncode}); is Chromium installed?")
        timings = json.loads(file.read_text())
    if args.out:
        Path(args.out).write_text(json.dumps(timings, indent=1))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, headless Chromium\n")
    print("| measure | value |\n|---|---|")
    for key, value in timings.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
