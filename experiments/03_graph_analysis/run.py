"""Experiment 03: the graph of experiment 02 analysed as a network, its feature grammar, and the
three predictions (sparse graph; heavy-tailed degrees with hubs that matter; excitation across
layers, inhibition within a layer) with their verdicts.

    python -m experiments.03_graph_analysis.run [--scale cpu|accelerator|smoke] [--corpus PATH]

Needs the build folder of experiment 02 at the same scale (run it first). Every statistic is compared
with degree- and sign-preserving rewired copies of the graph that keep the forward order of sites;
the hub test ablates the 10 features with the most out-edges and `hub_matched` random features of
matched firing rate for each (5 at --scale cpu), on sequences of the same corpus drawn with another seed; clamp and Jacobian
are compared on 16 sources of the first within-layer site pair (figures/estimator_agreement.png).
Writes report.md,
analysis.json and figures/ under results/, and results/verdicts.md.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from experiments.scales import arguments, setup, work_folder
from jfig import Atlas, load_graph
from jfig.analysis import analyze, compare_estimators, hub_ablation
from jfig.data import tokens_from
from jfig.errors import JfigError
from jfig.sites import parse_site

HERE = Path(__file__).parent


def estimator_check(model, saes, graph, tokens, n_sources: int = 16):
    """Clamp against Jacobian on the graph's first within-layer site pair (or first site pair): the
    n_sources sources with the most edges there, against every feature of the target site."""
    pairs = list(graph.manifest["statistics"]["n_tested_by_site_pair"])
    within = [p for p in pairs if len({parse_site(x).layer for x in p.split(" -> ")}) == 1]
    a, b = (within or pairs)[0].split(" -> ")
    e = graph.edges.to_pydict()
    counts: dict = {}
    for s, f, t in zip(e["source_site"], e["source"], e["target_site"]):
        if (s, t) == (a, b):
            counts[f] = counts.get(f, 0) + 1
    sources = sorted(counts, key=lambda f: -counts[f])[:n_sources]
    d_sae = next(x.d_sae for x in saes if x.site == b)
    return compare_estimators(model, saes, {a: sources}, tokens, methods=("clamp", "jacobian"),
                              targets={b: list(range(d_sae))}, inputs_per_source=32, read="pre")


def main():
    args = arguments(__doc__.splitlines()[0], str(HERE / "results")).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = work_folder(args)
    if not (work / "graph" / "manifest.json").exists():
        raise JfigError(f"no graph in {work / 'graph'}: run experiments/02_causal_graph at --scale {args.scale} first")
    graph = load_graph(work / "graph")
    atlas = Atlas.load(work / "atlas")
    model, saes, corpus, scale, corpus_text = setup(args)
    tokens = tokens_from(corpus, model, scale.seq_len, seed=1, max_tokens=scale.hub_sequences * scale.seq_len)
    t = time.perf_counter()
    hub = hub_ablation(model, saes, graph, tokens, k=10, matched=scale.hub_matched, by="out")
    hub_seconds = time.perf_counter() - t
    comparison = estimator_check(model, saes, graph, tokens)
    result = analyze(graph, seed=0, null_samples=scale.null_samples, community_nulls=min(5, scale.null_samples),
                     atlas=atlas, hub_test=hub, comparison=comparison)
    result.settings["estimator_agreement"] = comparison.summary()
    result.settings["hub_ablation_seconds"] = round(hub_seconds)
    result.settings["corpus"] = corpus_text
    result.write(args.out)
    lines = ["| prediction | verdict | reason |", "|---|---|---|"]
    for p in result.predictions.values():
        lines.append(f"| {p['prediction']} | **{p['verdict']}** | {p['reason']} |")
    (Path(args.out) / "verdicts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
