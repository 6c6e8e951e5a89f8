"""Experiment 09: feature circuits by ACDC-style ablation search, against the behaviour subgraph read off
the interaction graph.

    python -m experiments.09_feature_circuits.run --out DIR [--graph /tmp/demo_fresh2/graph]

On SmolLM2-135M with IOI prompts (corrupted: the subject's second mention replaced by a third name):
SAEs at blocks.10 / blocks.14 hook_resid_post (the demo graph's SAEs, from jfig's cache by fingerprint)
and at blocks.12 hook_attn_out / hook_mlp_out (small SAEs trained here once and cached,
`jfig.default_saes(sites=...)`). The search (`jfig.behaviors.feature_circuit`, corrupted ablation) runs at
the main threshold and a sweep; the circuit is compared with the IOI behaviour subgraph of the graph
(`behavior_subgraph`, k = 2) and with random node sets of the circuit's size per site (from the
candidates, and from the features active on the prompts). The faithfulness of the top-k attribution sets
for growing k says how many features a faithful circuit of these SAEs needs.

Writes, in experiments/09_feature_circuits/results/: circuit.md (the main circuit's summary),
circuit.json, circuit_edges.csv, sweep.md / sweep.json, comparison.md / comparison.json, null.json,
topk.json and summary.json (everything, with wall times). DIR holds the behaviour subgraph's report.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

import jfig
from jfig.behaviors import (behavior_subgraph, compare_circuits, feature_circuit, logit_diff, random_circuits,
                            set_faithfulness)
from jfig.behaviors.circuit_runs import rows_for, search_data, suite_tokens
from jfig.behaviors.circuit_search import candidate_attribution
from jfig.graph import load_graph
from jfig.pipeline.behavior import cached_saes_for

HERE = Path(__file__).parent
RESID = ("blocks.10.hook_resid_post", "blocks.14.hook_resid_post")
EXTRA = ("blocks.12.hook_attn_out", "blocks.12.hook_mlp_out")
EXTRA_SAE = dict(d_sae=512, k=16, tokens=16384, epochs=12)        # about 10 minutes on 2 CPU cores, once
SETTINGS = dict(behavior="ioi", n=10, candidates=8, threshold=0.02, sweep=(0.01, 0.05), n_random=30,
                topk=(12, 48, 192, 512))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="working folder (the behaviour subgraph's report)")
    p.add_argument("--graph", default="/tmp/demo_fresh2/graph", help="the demo graph (jfig demo) folder")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out, res = Path(args.out), HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    res.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    times = {}
    s = SETTINGS
    model = jfig.load_model()
    graph = load_graph(args.graph)
    graph_saes = cached_saes_for(model, graph.manifest)
    extra, extra_manifest = jfig.default_saes(model, sites=EXTRA, progress=False, **EXTRA_SAE)
    saes = model.check_saes(graph_saes + extra)
    sites = [x for x in saes if x in RESID + EXTRA]
    times["load"] = time.time() - t0

    t = time.time()
    circuit = feature_circuit(model, saes, s["behavior"], threshold=s["threshold"], sites=sites,
                              candidates=s["candidates"], n=s["n"])
    times["search"] = time.time() - t
    (res / "circuit.md").write_text(circuit.summary())
    (res / "circuit.json").write_text(json.dumps(circuit.as_dict(), indent=1))
    pacsv.write_csv(circuit.table(), res / "circuit_edges.csv")

    t = time.time()
    sweep = [circuit]
    for tau in s["sweep"]:
        sweep.append(feature_circuit(model, saes, s["behavior"], threshold=tau, sites=sites,
                                     candidates=s["candidates"], n=s["n"], check=False))
    sweep.sort(key=lambda c: c.threshold)
    times["sweep"] = time.time() - t
    nodes = [set(c.nodes) for c in sweep]
    edges = [{(e.source_site, e.source, e.target_site, e.target) for e in c.edges} for c in sweep]
    sweep_rows = [{"threshold": c.threshold, "nodes": len(c.nodes), "edges": len(c.edges),
                   "candidate_edges": c.n_candidate_edges, "faithfulness": c.faithfulness,
                   "node_faithfulness": c.node_faithfulness, "states": c.n_states, "seconds": c.seconds,
                   "nodes_subset_of_previous": bool(i == 0 or nodes[i] <= nodes[i - 1]),
                   "edges_subset_of_previous": bool(i == 0 or edges[i] <= edges[i - 1])}
                  for i, c in enumerate(sweep)]
    (res / "sweep.json").write_text(json.dumps(sweep_rows, indent=1))
    lines = ["| threshold | nodes | edges (of candidate edges) | faithfulness | nodes-only faithfulness | "
             "nested in the previous row | states run | seconds |", "|---|---|---|---|---|---|---|---|"]
    nested = ["yes" if r["nodes_subset_of_previous"] and r["edges_subset_of_previous"] else "no" for r in sweep_rows]
    lines += [f"| {r['threshold']:g} | {r['nodes']} | {r['edges']} ({r['candidate_edges']}) | "
              f"{r['faithfulness']:.3f} | {r['node_faithfulness']:.3f} | {y} | {r['states']} | {r['seconds']:.0f} |"
              for r, y in zip(sweep_rows, nested)]
    (res / "sweep.md").write_text("\n".join(lines) + "\n")

    t = time.time()
    sub = behavior_subgraph(model, graph_saes, graph, s["behavior"], k=2, n=s["n"], n_random=0, n_null=0,
                            min_effect=0.02, heads=False)
    sub.write(out / "behavior_subgraph")
    cmp = compare_circuits(model, saes, s["behavior"], circuit, sub)
    (res / "comparison.md").write_text(cmp.table())
    (res / "comparison.json").write_text(json.dumps(cmp.as_dict(), indent=1))
    times["subgraph_and_comparison"] = time.time() - t

    t = time.time()
    search_saes = {x: saes[x] for x in sites}
    _, batch = suite_tokens(model, s["behavior"], s["n"], 0)
    data = search_data(model, search_saes, batch, rows_for(batch, "corrupted"), "corrupted")
    attribution = candidate_attribution(model, search_saes, logit_diff, data)
    active = {x: np.flatnonzero((data.clean[x] * data.positions[..., None]).max((0, 1)) > 0) for x in sites}
    pools = {"candidates": circuit.candidates, "active": active}
    null = {}
    for name, pool in pools.items():
        f = set_faithfulness(model, saes, s["behavior"], circuit, random_circuits(circuit, pool, s["n_random"], seed=1))
        null[name] = {"mean": float(f.mean()), "sd": float(f.std()), "max": float(f.max()),
                      "values": [float(x) for x in f]}
    circuit_nodes_only = float(set_faithfulness(model, saes, s["behavior"], circuit, [circuit.nodes])[0])
    for v in null.values():
        v["p"] = float((1 + sum(x >= circuit_nodes_only for x in v["values"])) / (1 + len(v["values"])))
    topk_sets = [[(x, int(f)) for x in sites for f in np.argsort(-np.abs(attribution[x]))[:k]] for k in s["topk"]]
    topk = dict(zip(map(str, s["topk"]), map(float, set_faithfulness(model, saes, s["behavior"], circuit, topk_sets))))
    (res / "null.json").write_text(json.dumps({"circuit_nodes_only": circuit_nodes_only, **null}, indent=1))
    (res / "topk.json").write_text(json.dumps(topk, indent=1))
    times["null_and_topk"] = time.time() - t
    times["total"] = time.time() - t0

    summary = {"settings": {**s, "sites": sites, "extra_sae": EXTRA_SAE, "graph": args.graph},
               "extra_sae_metrics": extra_manifest.get("metrics"), "circuit": circuit.as_dict(),
               "sweep": sweep_rows, "comparison": cmp.as_dict(),
               "behavior_subgraph": {"seeds": [x._asdict() for x in sub.seeds], "nodes": len(sub.subgraph),
                                     "edges": sub.subgraph.edges.num_rows},
               "null": {k: {kk: vv for kk, vv in v.items() if kk != "values"} for k, v in null.items()},
               "circuit_nodes_only_faithfulness": circuit_nodes_only, "topk_faithfulness": topk,
               "seconds": {k: round(v, 1) for k, v in times.items()}}
    (res / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    logging.info("done in %.0f s: %s", times["total"], json.dumps(summary["seconds"]))


if __name__ == "__main__":
    main()
