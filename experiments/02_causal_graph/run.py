"""Experiment 02: the causal Feature Interaction Graph of SmolLM2-135M, dense over the chosen sources.

    python -m experiments.02_causal_graph.run [--scale cpu|accelerator|smoke] [--corpus PATH]

Every source feature (the top `top_k` per site by attribution importance) is clamped on its own
inputs and read against every feature of every later SAE site in a 5-layer window, including the
hook_resid_post of its own layer when the source sits at hook_resid_mid (the MLP alone). Edges:
Bonferroni-corrected p < 0.01 and |effect| above the random-direction null's 99th percentile for
the site pair. Writes results/summary.json and results/site_pairs.csv (pairs tested, edges and
excitatory share per site pair); the build folder holds the graph for experiment 03.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

from experiments.scales import arguments, describe, setup, work_folder
from jfig.pipeline import build_graph

HERE = Path(__file__).parent
BUILD = dict(targets="all", read="pre", importance="attribution", importance_sequences=8, block_size=16,
             batch_size=16, window=5)


def build(args):
    model, saes, corpus, scale, corpus_text = setup(args)
    t = time.perf_counter()
    graph = build_graph(model, saes, corpus, out_dir=work_folder(args), progress=True, seq_len=scale.seq_len,
                        max_sequences=scale.max_sequences, top_k=scale.top_k,
                        inputs_per_source=scale.inputs_per_source, **BUILD)
    return graph, time.perf_counter() - t, scale, corpus_text


def site_pair_table(graph) -> list[dict]:
    st = graph.manifest["statistics"]
    e = graph.edges.to_pydict()
    rows = {}
    for a, b, kind in zip(e["source_site"], e["target_site"], e["kind"]):
        r = rows.setdefault(f"{a} -> {b}", {"excitatory": 0, "inhibitory": 0, "gating": 0})
        r[kind] += 1
    out = []
    for pair, tested in st["n_tested_by_site_pair"].items():
        r = rows.get(pair, {"excitatory": 0, "inhibitory": 0, "gating": 0})
        first = r["excitatory"] + r["inhibitory"]
        out.append({"site_pair": pair, "tested": tested, "excitatory": r["excitatory"], "inhibitory": r["inhibitory"],
                    "edge_fraction": round(first / tested, 6) if tested else None,
                    "excitatory_share": round(r["excitatory"] / first, 4) if first else None,
                    "tau": st["tau_by_site_pair"].get(pair)})
    return out


def main():
    args = arguments(__doc__.splitlines()[0], str(HERE / "results")).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    graph, seconds, scale, corpus_text = build(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = site_pair_table(graph)
    with open(out / "site_pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    kinds = graph.edges.column("kind").to_pylist()
    summary = {"scale": args.scale, "settings": describe(scale), "build_options": BUILD, "corpus": corpus_text,
               "graph": str(work_folder(args) / "graph"), "build_seconds": round(seconds),
               "pairs_tested": graph.manifest["statistics"]["n_tested"],
               "edges": {k: kinds.count(k) for k in ("excitatory", "inhibitory", "gating")},
               "pruning": graph.manifest["pruning_report"],
               "nodes": graph.nodes.num_rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(graph.summary())
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
