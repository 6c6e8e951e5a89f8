"""Experiment 09, the null with rest nodes: the circuit's feature nodes against random candidates.

    python -m experiments.09_feature_circuits.null_with_rest      (after run.py)

The circuit of results/circuit.json keeps rest nodes (every non-candidate feature of a site) at some sites,
so its sparse part alone is no better than random sets (null.json). Here each random set keeps the same
rest nodes and the circuit's number of feature nodes per site, drawn from that site's candidates, with
every edge present: does the search pick the candidates that matter, given the rest of the model? Writes
results/null_rest.json.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

import jfig
from jfig.behaviors import FeatureCircuit, random_circuits, set_faithfulness
from jfig.graph import load_graph
from jfig.pipeline.behavior import cached_saes_for

from .run import EXTRA, EXTRA_SAE, SETTINGS

HERE = Path(__file__).parent


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    d = json.loads((HERE / "results" / "circuit.json").read_text())
    summary = json.loads((HERE / "results" / "summary.json").read_text())
    model = jfig.load_model()
    graph = load_graph(summary["settings"]["graph"])
    extra, _ = jfig.default_saes(model, sites=EXTRA, progress=False, **EXTRA_SAE)
    saes = model.check_saes(cached_saes_for(model, graph.manifest) + extra)
    m = d["metric"]
    circuit = FeatureCircuit(
        behavior=d["behavior"], threshold=d["threshold"], ablation=d["ablation"], sites=tuple(d["sites"]),
        nodes=tuple((n["site"], n["feature"]) for n in d["nodes"]), node_delta={}, edges=(),
        n_candidate_edges=d["n_candidate_edges"], rest_sites=tuple(d["rest_sites"]), rest_delta=d["rest_delta"],
        candidates=d["candidates"], attribution=d["attribution"], clean=m["clean"], none=m["none"],
        start=m["candidates"], node_metric=m["nodes"], metric=m["circuit"], sparse_metric=m["sparse"],
        options=d["options"])
    sets = [list(circuit.nodes)] + random_circuits(circuit, circuit.candidates, SETTINGS["n_random"], seed=2)
    f = set_faithfulness(model, saes, d["behavior"], circuit, sets, rest_sites=circuit.rest_sites)
    null = f[1:]
    out = {"circuit_nodes_with_rest": float(f[0]), "reported_node_faithfulness": circuit.node_faithfulness,
           "null_mean": float(null.mean()), "null_sd": float(null.std()), "null_min": float(null.min()),
           "null_max": float(null.max()), "p_higher": float((1 + np.sum(null >= f[0])) / (1 + len(null))),
           "n_random": len(null), "values": [float(x) for x in null], "seconds": round(time.time() - t0, 1)}
    (HERE / "results" / "null_rest.json").write_text(json.dumps(out, indent=1))
    logging.info("circuit %.3f, random candidates %.3f +- %.3f (p %.3g)", f[0], null.mean(), null.std(),
                 out["p_higher"])


if __name__ == "__main__":
    main()
