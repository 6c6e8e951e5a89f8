"""Experiment 04: behaviour circuits in the graph of experiment 02, and prediction 9.4 (behaviour
subgraphs are modular).

    python -m experiments.04_behaviours.run [--scale cpu|accelerator|smoke] [--work BUILD_FOLDER]

For each behaviour suite (factual recall, induction, IOI, sentiment, refusal): the model's baseline,
seed features (attribution patching, confirmed by exact ablation), the 2-hop subgraph (each feature's
10 strongest edges per direction), its sufficiency and necessity against firing-rate-matched random
sets, its self-containment against subgraphs grown from matched random seeds, and for induction and
IOI the heads found by patching and their shares of the strongest subgraph edges. Then the pairwise
overlap of the behaviours' subgraphs against chance. Writes results/<behaviour>/ (report.md,
circuit.json), results/summary.md, results/overlap.json, results/circuits.png and results/verdict.md.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import matplotlib
import numpy as np

from experiments.scales import arguments, built_graph, work_folder
from jfig.behaviors import behavior_subgraph, overlap
from jfig.data import BEHAVIORS
from jfig.errors import JfigError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
# --scale picks the graph (experiments/build-<scale>) and these settings: prompts per suite, random
# control sets, random seed sets for self-containment, attribution candidates, and the smallest ablation
# drop (fraction of the clean logit difference) that makes a candidate a seed: single features of these
# narrow SAEs move a 7-nat factual logit difference by at most ~3 %
SETTINGS = {
    "smoke": dict(n=8, n_random=4, n_null=5, n_candidates=16, min_effect=0.02),
    "cpu": dict(n=24, n_random=20, n_null=50, n_candidates=32, min_effect=0.02),
    "accelerator": dict(n=96, n_random=100, n_null=200, n_candidates=64, min_effect=0.02),
}


def figure(rows: list, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for ax, key in zip(axes, ("sufficiency", "necessity")):
        for i, r in enumerate(rows):
            ctrl = r["circuit_test"][f"random_{key}"]
            ax.scatter(np.full(len(ctrl), i) + np.random.default_rng(i).uniform(-0.15, 0.15, len(ctrl)), ctrl,
                       s=8, color="0.6", label="matched random sets" if i == 0 else None)
            ax.scatter([i], [r["circuit_test"][key]], s=60, color="C3", marker="D", label="subgraph" if i == 0 else None)
        ax.set_xticks(range(len(rows)), [r["behavior"] for r in rows], rotation=20)
        ax.set_ylabel(key)
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(1, color="k", lw=0.5, ls=":")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(rows: list, overlaps: list) -> str:
    contained = [r for r in rows if r["self_containment"]["p"] < 0.05]
    sufficient = [r for r in rows if r["circuit_test"]["p_sufficiency"] < 0.05]
    above = [o for o in overlaps if o["p_more"] < 0.05]
    supported = len(contained) > len(rows) / 2 and len(sufficient) > len(rows) / 2
    return "\n".join([
        "# Prediction 9.4: behaviour subgraphs are modular", "",
        "Statistic: per behaviour, the internal fraction of the subgraph's edges against subgraphs grown the same "
        "way from matched random seeds (self-containment), and sufficiency against firing-rate-matched random "
        "sets; across behaviours, the Jaccard overlap of node sets against random sets of the same sizes.",
        "Supported when most behaviours' subgraphs are both more self-contained and more sufficient than their "
        "controls (p < 0.05).", "",
        f"- self-contained beyond chance: {len(contained)} of {len(rows)} "
        f"({', '.join(r['behavior'] for r in contained) or 'none'})",
        f"- sufficient beyond chance: {len(sufficient)} of {len(rows)} "
        f"({', '.join(r['behavior'] for r in sufficient) or 'none'})",
        f"- behaviour pairs overlapping more than chance: {len(above)} of {len(overlaps)}", "",
        f"**Verdict: {'supported' if supported else 'not supported'}** on this graph.", ""])


def main():
    ap = arguments(__doc__.splitlines()[0], str(HERE / "results"))
    ap.add_argument("--behaviors", default=",".join(BEHAVIORS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    graph, model, saes = built_graph(args)          # experiment 02's graph and the SAEs it was built with
    settings = SETTINGS[args.scale]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, node_sets, lines = [], {}, []
    for name in args.behaviors.split(","):
        t = time.perf_counter()
        try:
            c = behavior_subgraph(model, saes, graph, name, k=2, seed=0, **settings)
        except JfigError as err:
            logging.warning("%s: %s", name, err)
            lines.append(f"| {name} | — | — | — | — | — | — | — | — | {err} |")
            continue
        c.write(out / name)
        d = c.as_dict()
        d["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(d)
        node_sets[name] = list(c.subgraph.nodes)
        ct, sc = d["circuit_test"], d["self_containment"]
        lines.append(f"| {name} | {d['baseline']['accuracy']:.2f} | {len(d['seeds'])} | {d['subgraph']['n_nodes']} | "
                     f"{ct['sufficiency']:.3f} (ctrl {np.mean(ct['random_sufficiency']):.3f}, p {ct['p_sufficiency']:.2g}) | "
                     f"{ct['necessity']:.3f} (ctrl {np.mean(ct['random_necessity']):.3f}, p {ct['p_necessity']:.2g}) | "
                     f"{d['seeds_only_test']['sufficiency']:.3f} | {d['seeds_only_test']['necessity']:.3f} | "
                     f"{sc['internal_fraction']:.3f} (null {sc['null_mean']:.3f}, p {sc['p']:.2g}) | {d['seconds']} s |")
    overlaps = overlap(graph, node_sets, n_null=1000, seed=0) if len(node_sets) > 1 else []
    (out / "overlap.json").write_text(json.dumps(overlaps, indent=1) + "\n")
    summary = ["# Experiment 04: behaviour circuits", "",
               f"Graph: {work_folder(args) / 'graph'} ({graph.n_nodes} features, {graph.n_edges} edges). Settings: {settings}.", "",
               "| behaviour | accuracy | seeds | subgraph features | sufficiency | necessity | seeds-only sufficiency | "
               "seeds-only necessity | internal edge fraction | time |", "|---|---|---|---|---|---|---|---|---|---|",
               *lines, "", "## Overlap between behaviours' subgraphs", "",
               "| a | b | shared features | Jaccard | chance (mean) | p (more) | p (less) |", "|---|---|---|---|---|---|---|"]
    summary += [f"| {o['a']} | {o['b']} | {o['shared']} | {o['jaccard']:.3f} | {o['null_mean']:.4f} | {o['p_more']:.3g} | "
                f"{o['p_less']:.3g} |" for o in overlaps]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    if rows:
        figure(rows, out / "circuits.png")
    (out / "verdict.md").write_text(verdict(rows, overlaps))
    print("\n".join(summary))


if __name__ == "__main__":
    main()
