"""Experiment 06, adversarial pairs: can feature pairs that rarely fire together but share a strong causal
edge be made to fire together by swapping a few tokens, and is their joint effect on the next token then
larger, or less additive, than that of random pairs?

    jfig demo --out DEMO                      # once: a SmolLM2-135M graph with its atlas and build folder
    python -m experiments.06_compact_proof_metrics.adversarial --graph DEMO/graph [--pairs 4] [--steps 20]

Pairs (jfig.interactions.adversarial_pairs, as `jfig adversarial` selects them): the top `pairs`
excitatory and the top `pairs` inhibitory edges by |weight| × −log P̂(co-occurrence), among pairs that
co-occur no more often than independence predicts, without sequence-start features, one pair per feature.
Null: for each of them a random pair at the same two sites, each feature drawn from the 5 features whose
atlas firing counts are closest to the original's (no sequence-start features, not an edge of the graph).
Every pair is searched the same way (`pair_examples`: the same starts, windows, steps and candidates):
windows of the graph's corpus where one feature fires most strongly, greedy gradient-guided token swaps
maximising the soft minimum of the two features' margins at the window's last position p.

Measured per window: whether both features fire at p before the search (no search: the corpus as it is)
and after it, the number of tokens swapped, and at p after the search the next-token KL(clean || ablated)
for each feature and both ablated, and the non-additivity ||Δ_ab − Δ_a − Δ_b|| of the log-probability
changes. Writes results/adversarial_pairs.csv (per pair), results/adversarial_examples.csv (per window)
results/adversarial.md and results/adversarial_setting.json; --summary-only rewrites the two summaries from the
per-window CSV of an earlier run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from scipy import stats as sps

from jfig.atlas import Atlas
from jfig.graph import load_graph
from jfig.interactions import pair_frequency
from jfig.models.registry import load_model
from jfig.pipeline import find_atlas
from jfig.pipeline.adversarial import (AdversarialOptions, corpus_tokens, pair_examples, select_pairs, start_only,
                                       summary_rows)
from jfig.pipeline.behavior import cached_saes_for

HERE = Path(__file__).parent
NEAREST = 5


def matched_null(graph, atlas: Atlas, pairs: pa.Table, seed: int) -> pa.Table:
    """One random pair per row of `pairs`: same sites, each feature drawn among the NEAREST features by
    atlas firing count (log scale), no sequence-start feature, not an edge of the graph."""
    rng = np.random.default_rng(seed)
    e = graph.edges
    edge_keys = set(zip(e["source_site"].to_pylist(), e["source"].to_pylist(), e["target_site"].to_pylist(),
                        e["target"].to_pylist()))
    used = {(r["source_site"], r["source"]) for r in pairs.to_pylist()} | \
        {(r["target_site"], r["target"]) for r in pairs.to_pylist()}
    rows = []
    for r in pairs.to_pylist():
        for _ in range(50):
            picked = []
            for site, f in ((r["source_site"], r["source"]), (r["target_site"], r["target"])):
                n = np.asarray(atlas.firing_count(site), np.float64)
                order = np.argsort(np.abs(np.log1p(n) - np.log1p(n[f])), kind="stable")
                ok = [int(c) for c in order if n[c] > 0 and (site, int(c)) not in used
                      and not start_only(atlas, site, int(c))][:NEAREST]
                picked.append(int(rng.choice(ok)))
            key = (r["source_site"], picked[0], r["target_site"], picked[1])
            if key not in edge_keys:
                break
        used |= {(key[0], key[1]), (key[2], key[3])}
        n_i = float(atlas.firing_count(key[0])[key[1]])
        n_j = float(atlas.firing_count(key[2])[key[3]])
        count = pair_frequency(atlas, [key[0]], [key[1]], [key[2]], [key[3]])[0] * atlas.n_tokens
        rows.append(dict(source_site=key[0], source=key[1], target_site=key[2], target=key[3], kind="null",
                         weight=float("nan"), count=int(round(count)) if np.isfinite(count) else -1,
                         expected=n_i * n_j / atlas.n_tokens))
    return pa.Table.from_pylist(rows)


def _median(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.median(x)) if len(x) else float("nan")


def summarize(examples: pa.Table, sets: dict) -> tuple[list[dict], str]:
    """Per set: windows, successes before / after, swaps and output effects; the tests against the null."""
    rows = examples.to_pylist()
    out = []
    for name, kinds in sets.items():
        sel = [r for r in rows if r["set"] == name]
        hit = [r for r in sel if r["success"]]
        pairs_hit = len({r["pair"] for r in hit})
        out.append(dict(set=name, pairs=len({r["pair"] for r in sel}), pairs_made_to_fire=pairs_hit, windows=len(sel),
                        both_before=sum(r["success_before"] for r in sel), both_after=len(hit),
                        swaps=_median([r["swaps"] for r in hit]), kl_source=_median([r["kl_source"] for r in hit]),
                        kl_target=_median([r["kl_target"] for r in hit]), kl_both=_median([r["kl_both"] for r in hit]),
                        interaction=_median([r["interaction"] for r in hit]),
                        relative=_median([r["relative"] for r in hit])))
    lines = ["| set | pairs (made to fire together) | windows | both fire before → after | median swaps | "
             "KL source / target / both | interaction (relative) |", "|---|---|---|---|---|---|---|"]
    for s in out:
        lines.append(f"| {s['set']} | {s['pairs']} ({s['pairs_made_to_fire']}) | {s['windows']} | {s['both_before']} → "
                     f"{s['both_after']} | {s['swaps']:.0f} | {s['kl_source']:.3g} / {s['kl_target']:.3g} / "
                     f"{s['kl_both']:.3g} | {s['interaction']:.3g} ({s['relative']:.2f}) |")
    adv = [r for r in rows if r["set"] != "null"]
    null = [r for r in rows if r["set"] == "null"]
    table = [[sum(r["success"] for r in adv), sum(not r["success"] for r in adv)],
             [sum(r["success"] for r in null), sum(not r["success"] for r in null)]]
    fisher = sps.fisher_exact(table)
    lines += ["", f"Success after the search, adversarial vs null windows: {table[0][0]}/{len(adv)} vs "
                  f"{table[1][0]}/{len(null)} (Fisher exact odds ratio {fisher.statistic:.3g}, two-sided p "
                  f"{fisher.pvalue:.3g}; windows of one pair are not independent)."]
    for key in ("interaction", "relative", "kl_both"):
        a = [r[key] for r in adv if r["success"]]
        b = [r[key] for r in null if r["success"]]
        if len(a) and len(b):
            u = sps.mannwhitneyu(a, b, alternative="two-sided")
            lines.append(f"{key} where both fire after the search: median {_median(a):.3g} (adversarial, {len(a)} "
                         f"windows) vs {_median(b):.3g} (null, {len(b)}); Mann–Whitney p {u.pvalue:.3g}.")
    return out, "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graph", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=4, help="adversarial pairs per edge kind (each gets a null pair)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--starts", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--summary-only", action="store_true",
                    help="rewrite adversarial.md from the CSVs of an earlier run in --out (no model runs)")
    args = ap.parse_args(argv)
    t0 = time.time()
    graph_dir = Path(args.graph)
    graph = load_graph(graph_dir)
    atlas_dir = find_atlas(graph_dir)
    if atlas_dir is None:
        raise SystemExit(f"no atlas beside {graph_dir}: run `jfig demo --out DEMO` and pass DEMO/graph")
    atlas = Atlas.load(atlas_dir)
    opts = AdversarialOptions(pairs=args.pairs, steps=args.steps, starts=args.starts, candidates=args.candidates,
                              seed=args.seed)
    chosen, notes = [], []
    for kind in ("excitatory", "inhibitory"):
        opts.kinds = (kind,)
        used = [(r[a], r[b]) for c in chosen for r in c.to_pylist()
                for a, b in (("source_site", "source"), ("target_site", "target"))]
        t, n = select_pairs(graph, atlas, opts, exclude=used)
        chosen.append(t.append_column("set", pa.array([kind] * t.num_rows)))
        notes += n
    adv = pa.concat_tables([c.select(["source_site", "source", "target_site", "target", "kind", "weight", "count",
                                      "expected", "set"]) for c in chosen])
    null = matched_null(graph, atlas, adv, args.seed)
    null = null.append_column("set", pa.array(["null"] * null.num_rows))
    pairs = pa.concat_tables([adv, null.cast(adv.schema)])
    out = Path(args.out)
    if args.summary_only:
        examples = pacsv.read_csv(out / "adversarial_examples.csv")
        for i, f in enumerate(examples.schema):                  # CSV writes NaN as an empty field
            if pa.types.is_floating(f.type):
                examples = examples.set_column(i, f.name, pc.fill_null(examples[f.name], float("nan")))
        setting = json.loads((out / "adversarial_setting.json").read_text())
        write_summary(out, examples, pairs["set"].to_pylist(), notes, args, opts, graph_dir, setting["minutes"])
        return
    model = load_model(args.model)
    saes = cached_saes_for(model, graph.manifest)
    tokens = corpus_tokens(model, graph.manifest, opts.corpus, atlas)
    print(f"{adv.num_rows} adversarial + {null.num_rows} null pairs; setup {time.time() - t0:.0f} s", flush=True)
    examples = pair_examples(model, saes, atlas, tokens, pairs, opts, progress=True)
    sets = pairs["set"].to_pylist()
    examples = examples.append_column("set", pa.array([sets[p - 1] for p in examples["pair"].to_pylist()]))
    out.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(examples.drop_columns(["tokens_after"]), out / "adversarial_examples.csv")
    minutes = (time.time() - t0) / 60
    (out / "adversarial_setting.json").write_text(json.dumps(
        dict(minutes=round(minutes, 1), pairs_per_kind=args.pairs, steps=args.steps, starts=args.starts,
             candidates=args.candidates, top_k=opts.top_k, window=opts.window, seed=args.seed), indent=1) + "\n")
    write_summary(out, examples, sets, notes, args, opts, graph_dir, minutes)


def write_summary(out: Path, examples: pa.Table, sets: list, notes: list, args, opts, graph_dir, minutes: float):
    """results/adversarial_pairs.csv and results/adversarial.md from the per-window table."""
    per_pair = summary_rows(examples)
    for r in per_pair:
        r["set"] = sets[r["pair"] - 1]
    pacsv.write_csv(pa.Table.from_pylist(per_pair), out / "adversarial_pairs.csv")
    _, text = summarize(examples, {"excitatory": ("excitatory",), "inhibitory": ("inhibitory",), "null": ("null",)})
    md = [f"# Adversarial pairs of {graph_dir} ({minutes:.1f} min)", "", *(f"- {n}" for n in notes),
          f"- {args.steps} steps, {args.starts} windows per pair, {args.candidates} swaps evaluated per window "
          f"and step from the top {opts.top_k} tokens per position, windows of {opts.window} tokens", "",
          text, "", "Per pair (medians over the windows where both fire after the search):", "",
          "| # | set | source | target | weight | count (expected) | both fire before → after | swaps | KL both | "
          "interaction (relative) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in per_pair:
        md.append(f"| {r['pair']} | {r['set']} | {r['source']} | {r['target']} | {r['weight']:+.3g} | {r['count']} "
                  f"({r['expected']:.3g}) | {r['before']}/{r['starts']} → {r['after']}/{r['starts']} | "
                  f"{r['swaps']:.0f} | {r['kl_both']:.3g} | {r['interaction']:.3g} ({r['relative']:.2f}) |")
    (out / "adversarial.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
