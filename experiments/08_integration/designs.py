"""Experiment 08 (2x2 designs and integration neurons): are the graph's gating pairs integrated?

    jfig demo --out DEMO                      # once: a SmolLM2-135M graph with its atlas and build folder
    python -m experiments.08_integration.designs --graph DEMO/graph

Three questions on a saved graph (its SAEs from jfig's cache, its atlas beside it, the build's tokens):

1. Intervention designs. For every (source, modulator) pair of the graph's gating hyperedges, clamp both
   off / on at the source's strongest position and read the gated targets: the four-cell fit's D per
   input, its sign-flip p-value and a null of random partners (the source with random features of the
   modulator's site; D's t statistic across inputs against theirs). The same for random pairs of the graph's sources at that site, read on the same
   targets, read as encoder pre-activations (as the build read them). Off levels: "low" (the 10th
   percentile of non-zero activations; D / (Δa·Δb) is the graph's factorial statistic), "absent" (0)
   and "opposite" (the low end of the encoder pre-activation, the source document's design). The
   clamp goes at the source's strongest position from position 1 on (skip1), and, for "low", also
   from position 0 on (skip0: the build's own choice, which may be the sequence-start token).
2. A stimulus design: prompts that cross tone (positive / negative opening) with truth (the right or a
   wrong capital), every feature of every SAE read at the last token; main effects and interaction
   by OLS; the number of features with a Bonferroni-significant interaction, against the same count
   with the truth labels shuffled (the null).
3. Integration neurons at the MLP that reads the gating pairs' site: per neuron, the product term of
   each candidate pair over a linear fit of the 512 most frequent SAE features (and the candidates');
   whether the gating pairs rank higher than random co-active pairs (atlas), random firing pairs,
   their shared feature with random partners, and candidates of the same co-occurrence decile
   (hypergeometric and permutation tests).

Writes results/designs_*.csv, results/neurons_*.csv and results/designs_summary.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats as sps

import jfig
from jfig.atlas import Atlas
from jfig.data import tokens_from
from jfig.data.prompts import CAPITALS, NEGATIVE, POSITIVE
from jfig.integration import (feature_readout, gating_enrichment, gating_pairs, integration_neurons,
                              intervention_design, site_values, stimulus_design)
from jfig.interactions.pairs import coactive_pairs
from jfig.pipeline import find_atlas
from jfig.pipeline.behavior import cached_saes_for
from jfig.stats import bonferroni

HERE = Path(__file__).parent
T0 = time.time()
VARIANTS = (("low", 0), ("low", 1), ("absent", 1), ("opposite", 1))     # (off level, skip_positions)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", required=True, help="graph folder of a build with gating edges (e.g. DEMO/graph)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sequences", type=int, default=64, help="sequences of the build's corpus used (64 tokens each)")
    p.add_argument("--inputs", type=int, default=16, help="inputs per intervention design")
    p.add_argument("--null", type=int, default=16, help="random partners per design")
    p.add_argument("--random-pairs", type=int, default=12, help="random source pairs for the designs")
    p.add_argument("--candidates", type=int, default=400, help="co-active and random candidate pairs, each")
    p.add_argument("--neuron-sequences", type=int, default=128, help="sequences of the integration-neuron fit")
    p.add_argument("--linear", type=int, default=512, help="most frequent features in the linear fit (plus the "
                                                         "candidates' own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"))
    return p.parse_args()


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------- 1. intervention designs

def gating_table(graph):
    """{(site, source, modulator): {target_site: [targets]}, ...} and the graph's statistic per triple."""
    cols = graph.edges.select(["kind", "source_site", "source", "modulator_site", "modulator", "target_site",
                               "target", "weight"]).to_pydict()
    pairs, weight = {}, {}
    for kind, ss, s, ms, m, ts, t, w in zip(*cols.values()):
        if kind != "gating" or ss != ms:
            continue
        pairs.setdefault((ss, int(s), int(m)), {}).setdefault(ts, []).append(int(t))
        weight[(ss, int(s), int(m), ts, int(t))] = float(w)
    return pairs, weight


def run_designs(model, saes, graph, tokens, args):
    pairs, weight = gating_table(graph)
    rng = np.random.default_rng(args.seed)
    rows, per_pair = [], []
    sites = sorted({p[0] for p in pairs})
    values = site_values(model, saes, sites, tokens, 16)
    prefixes = {s: model.prefix(tokens, s, cache=True) for s in sites}
    log(f"designs: {len(pairs)} gating pairs at {sites}; clean values and prefixes of {tokens.shape} tokens")
    sources = {s: np.unique(graph.edges.filter(
        np.asarray([x == s for x in graph.edges["source_site"].to_pylist()]))["source"].to_numpy()) for s in sites}
    jobs = [("gating", key, targets) for key, targets in sorted(pairs.items())]
    gating_keys = list(pairs)
    for n in range(args.random_pairs):                       # random pairs of the graph's sources, same targets
        site, _, _ = gating_keys[n % len(gating_keys)]
        fires = (values[site][0] > 0).any((0, 1))
        pool = sources[site][fires[sources[site]]]
        a, b = rng.choice(pool, 2, replace=False)
        jobs.append(("random", (site, int(a), int(b)), pairs[gating_keys[n % len(gating_keys)]]))
    for kind, (site, a, b), targets in jobs:
        reads = [feature_readout(ts, t) for ts in sorted(targets) for t in sorted(targets[ts])]
        for off, skip in VARIANTS:
            t1 = time.time()
            d = intervention_design(model, saes, (site, a), (site, b), reads, tokens, off=off, n_inputs=args.inputs,
                                    n_null=args.null, read="pre", values={site: values[site]},
                                    prefix=prefixes[site], skip_positions=skip, seed=args.seed)
            variant = f"{off}_skip{skip}"
            pres = d.by_presence()
            for r, ro in enumerate(reads):
                rows.append(dict(pair=kind, site=site, a=a, b=b, target_site=ro.site, target=ro.index, off=variant,
                                 n_inputs=len(d.inputs), at_bos=float(np.mean(d.positions == 0)), A=d.A[r], B=d.B[r], C=d.C[r], D=d.D[r], gating=d.gating[r],
                                 graph_gating=weight.get((site, a, b, ro.site, ro.index), np.nan),
                                 t=d.t[r], p_sign=d.p_sign[r], p_null=d.p_null[r],
                                 D_b_absent=pres[(True, False)][1][r], n_b_absent=pres[(True, False)][0],
                                 D_b_present=pres[(True, True)][1][r], n_b_present=pres[(True, True)][0]))
            per_pair.append(dict(pair=kind, site=site, a=a, b=b, off=variant, n_targets=len(reads),
                                 at_bos=float(np.mean(d.positions == 0)),
                                 min_p_sign=float(np.nanmin(d.p_sign)), min_p_null=float(np.nanmin(d.p_null)),
                                 mean_abs_gating=float(np.nanmean(np.abs(d.gating))),
                                 mean_abs_D=float(np.nanmean(np.abs(d.D)))))
            log(f"  {kind} {site}#{a} x #{b} {variant}: {len(reads)} targets, |D| {np.mean(np.abs(d.D)):.3g}, "
                f"min p_sign {np.nanmin(d.p_sign):.2g}, min p_null {np.nanmin(d.p_null):.2g} "
                f"({time.time() - t1:.0f} s)")
    return rows, per_pair


def summarise_designs(rows, alpha=0.01):
    out = {}
    for off, skip in VARIANTS:
        off = f"{off}_skip{skip}"
        sel = [r for r in rows if r["off"] == off]
        p = bonferroni(np.asarray([r["p_sign"] for r in sel]))
        entry = {}
        for kind in ("gating", "random"):
            k = np.asarray([r["pair"] == kind for r in sel])
            g = np.abs(np.asarray([r["gating"] for r in sel]))[k]
            pn = np.asarray([r["p_null"] for r in sel])[k]
            entry[kind] = dict(n_triples=int(k.sum()), significant_sign_flip=int((p[k] < alpha).sum()),
                               p_null_below_0_1=int((pn < 0.1).sum()), median_abs_gating=float(np.median(g)),
                               median_abs_D=float(np.median(np.abs([r["D"] for r, kk in zip(sel, k) if kk]))))
        for kind in ("gating", "random"):
            k = [r for r in sel if r["pair"] == kind]
            for where in ("b_present", "b_absent"):
                v = np.asarray([r[f"D_{where}"] for r in k], np.float64)
                entry[kind][f"median_abs_D_{where}"] = float(np.nanmedian(np.abs(v))) if np.isfinite(v).any() \
                    else float("nan")
                entry[kind][f"inputs_{where}"] = int(sum({(r["a"], r["b"]): r[f"n_{where}"] for r in k}.values()))
        ga = np.abs([r["gating"] for r in sel if r["pair"] == "gating"])
        ra = np.abs([r["gating"] for r in sel if r["pair"] == "random"])
        entry["mann_whitney_p_gating_larger"] = float(sps.mannwhitneyu(ga, ra, alternative="greater").pvalue)
        both = [(r["gating"], r["graph_gating"]) for r in sel if r["pair"] == "gating" and np.isfinite(r["graph_gating"])]
        if both and off.startswith("low"):
            x, y = np.asarray(both).T
            entry["vs_graph"] = dict(n=len(x), sign_agreement=float(np.mean(np.sign(x) == np.sign(y))),
                                     spearman=float(sps.spearmanr(x, y)[0]), median_ratio=float(np.median(x / y)))
        out[off] = entry
    return out


# ---------------------------------------------------------------- 2. stimulus design

def tone_truth_prompts(seed: int):
    """128 prompts: 32 countries x tone (positive / negative opening) x truth (right / wrong capital)."""
    rng = np.random.default_rng(seed)
    capitals = [c for _, c in CAPITALS]
    rows = []
    for country, capital in CAPITALS:
        wrong = capitals[(capitals.index(capital) + 1 + rng.integers(len(capitals) - 1)) % len(capitals)]
        for tone, words in (("positive", POSITIVE), ("negative", NEGATIVE)):
            for truth, city in (("true", capital), ("false", wrong)):
                adj = words[int(rng.integers(len(words)))]
                rows.append(dict(text=f"What {adj} news: the capital of {country} is {city}", tone=tone, truth=truth))
    return rows


def run_stimulus(model, saes, out: Path, seed: int, alpha=0.01):
    prompts = tone_truth_prompts(seed)
    with open(out / "designs_stimulus_prompts.jsonl", "w") as fh:
        for p in prompts:
            fh.write(json.dumps(p) + "\n")
    texts = [p["text"] for p in prompts]
    tone, truth = [p["tone"] for p in prompts], [p["truth"] for p in prompts]
    shuffled = list(np.random.default_rng(seed + 7).permutation(truth))
    summary, rows = {"n_prompts": len(texts)}, []
    for reduce in ("last", "mean"):
        d = stimulus_design(model, saes, texts, tone, truth, levels_a=("negative", "positive"),
                            levels_b=("false", "true"), reduce=reduce)
        d0 = stimulus_design(model, saes, texts, tone, shuffled, levels_a=("negative", "positive"),
                             levels_b=("false", "true"), reduce=reduce)
        entry = {"n_features": len(d.features), "counts": d.counts.tolist()}
        for name, des in (("real", d), ("truth_shuffled", d0)):
            entry[name] = {e: int((bonferroni(np.nan_to_num(des.effects[e]["p"], nan=1.0)) < alpha).sum())
                           for e in ("a", "b", "interaction")}
        top = d.discriminative("interaction", k=10)
        rows += ([dict(reduce=reduce, effect="interaction", **t) for t in top]
                 + [dict(reduce=reduce, effect="tone", **t) for t in d.discriminative("a", k=5)]
                 + [dict(reduce=reduce, effect="truth", **t) for t in d.discriminative("b", k=5)])
        entry["top_interaction"] = top[:3]
        summary[reduce] = entry
    write_csv(out / "designs_stimulus_top.csv", rows)
    return summary


# ---------------------------------------------------------------- 3. integration neurons

def finite_max(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.max(np.where(np.isfinite(x), x, -np.inf), initial=-np.inf))


def matched_enrichment(r, g, seed: int, n_perm: int = 10000, n_bins: int = 10) -> dict:
    """Mean rank (best neuron, each criterion) of the gating pairs against random candidates drawn from the
    same co-occurrence decile as each gating pair (a pair that fires together more often can carry more
    product variance); p = P(random mean rank <= observed)."""
    rows = np.asarray([int(np.flatnonzero((r.pairs == p).all(1))[0]) for p in g])
    co = r.cooccurrence.astype(np.float64)
    edges = np.quantile(co, np.linspace(0, 1, n_bins + 1)[1:-1])
    bins = np.searchsorted(edges, co, side="right")
    others = np.setdiff1d(np.arange(len(co)), rows)
    rng = np.random.default_rng(seed)
    out = {"gating_cooccurrence": co[rows].tolist(), "cooccurrence_percentile": [
        float((co < co[t]).mean()) for t in rows]}
    for c in ("weight", "difference", "variance"):
        score = r.pair_scores(c)
        rank = np.empty(len(score))
        rank[np.argsort(-score, kind="stable")] = np.arange(1, len(score) + 1)
        draws = np.stack([rng.choice(others[bins[others] == bins[t]] if (bins[others] == bins[t]).any() else others,
                                     n_perm) for t in rows], axis=1)              # [n_perm, G]
        null = rank[draws].mean(1)
        obs = rank[rows].mean()
        out[c] = dict(mean_rank_gating=float(obs), mean_rank_matched=float(null.mean()),
                      p=float((1 + (null <= obs).sum()) / (1 + n_perm)))
    return out


def run_neurons(model, saes, graph, atlas, tokens, args, out: Path):
    pairs, _ = gating_table(graph)
    site = sorted({p[0] for p in pairs})[0]
    sae = saes[site]
    g = gating_pairs(graph, site)
    rng = np.random.default_rng(args.seed + 3)
    co = coactive_pairs(atlas, site, k=4 * args.candidates)
    co = co[rng.choice(len(co), min(args.candidates, len(co)), replace=False)]
    fires = np.flatnonzero(atlas.firing_rate(site) > 0)
    rand = np.stack([rng.choice(fires, 2, replace=False) for _ in range(args.candidates)])
    srcs = np.unique(g[:, 0] if len(np.unique(g[:, 0])) <= len(np.unique(g[:, 1])) else g[:, 1])
    partners = np.setdiff1d(fires, g.reshape(-1))
    same = np.stack([np.stack([np.full(40, s_), rng.choice(partners, 40, replace=False)], 1) for s_ in srcs]
                    ).reshape(-1, 2)                       # the gating pairs' shared feature with random partners
    cand = np.unique(np.sort(np.concatenate([g, co, rand, same]), axis=1), axis=0)
    counts = site_values(model, saes, [site], tokens, 16)[site][0][:, 1:].reshape(-1, sae.d_sae)
    counts = (counts > 0).sum(0)
    linear = np.union1d(np.argsort(-counts, kind="stable")[:args.linear], cand.reshape(-1))
    t1 = time.time()
    r = integration_neurons(model, sae, tokens, cand, linear_features=linear, batch_size=16)
    log(f"integration neurons at layer {r.layer}: {len(cand)} pairs x {r.variance.shape[1]} neurons over "
        f"{r.n_tokens} tokens in {time.time() - t1:.0f} s")
    key = lambda arr: {tuple(p) for p in np.sort(arr, axis=1).tolist()}  # noqa: E731
    summary = {"site": site, "layer": r.layer, "n_tokens": r.n_tokens, "n_candidates": len(cand),
               "n_gating_pairs": len(g), "n_linear_features": len(linear),
               "median_r2_linear": float(np.nanmedian(r.r2_linear)),
               "median_r2_linear_adjusted": float(np.nanmedian(1 - (1 - r.r2_linear) * (r.n_tokens - 1)
                                                               / (r.n_tokens - len(linear) - 1)))}
    for label, pool in (("vs_coactive", key(co) | key(g)), ("vs_random", key(rand) | key(g)),
                        ("vs_same_feature", key(same) | key(g)), ("vs_all", None)):
        keep = np.asarray([pool is None or tuple(p) in pool for p in r.pairs.tolist()])
        sub = type(r)(**{**r.__dict__, **{k: getattr(r, k)[keep] for k in ("pairs", "weight", "difference",
                                                                             "variance", "p_value", "cooccurrence")}})
        summary[label] = {c: gating_enrichment(sub, g, criterion=c, top=0.1, n_perm=10000, seed=args.seed).__dict__
                          for c in ("weight", "difference", "variance")}
    summary["cooccurrence_matched"] = matched_enrichment(r, g, args.seed)
    best = r.pair_scores("variance")
    top = np.argsort(-best)[:20]
    gk = key(g)
    write_csv(out / "neurons_top_pairs.csv", [dict(i=int(r.pairs[t, 0]), j=int(r.pairs[t, 1]),
                                                   neuron=int(np.nanargmax(np.where(np.isfinite(r.variance[t]),
                                                                                    r.variance[t], -1))),
                                                   variance=float(best[t]),
                                                   weight=finite_max(np.abs(r.weight[t])),
                                                   difference=finite_max(r.difference[t]),
                                                   cooccurrence=int(r.cooccurrence[t]),
                                                   gating=tuple(r.pairs[t]) in gk) for t in top])
    write_csv(out / "neurons_gating_pairs.csv", [dict(i=int(p[0]), j=int(p[1]), **{
        f"rank_{c}": int(1 + (r.pair_scores(c) > r.pair_scores(c)[row]).sum()) for c in ("weight", "difference",
                                                                                          "variance")},
        best_variance=float(best[row]), cooccurrence=int(r.cooccurrence[row]))
        for p in g for row in np.flatnonzero((r.pairs == p).all(1))])
    sig = bonferroni(np.nan_to_num(r.p_value, nan=1.0).reshape(-1)) < 0.01
    summary["significant_pair_neuron_entries"] = int(sig.sum())
    summary["pairs_with_a_significant_neuron"] = int(sig.reshape(r.p_value.shape).any(1).sum())
    summary["top_entries"] = {c: r.ranked(c, 3) for c in ("weight", "difference", "variance")}
    return summary


def main():
    args = arguments()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    graph_dir = Path(args.graph)
    graph = jfig.load_graph(graph_dir)
    model = jfig.load_model(args.model)
    saes = {s.site: s for s in cached_saes_for(model, graph.manifest)}
    atlas = Atlas.load(find_atlas(graph_dir))
    st = graph.manifest["statistics"]
    tokens = tokens_from("default", model, st["seq_len"], max_tokens=st["n_sequences"] * st["seq_len"])
    neuron_tokens = np.asarray(tokens)[: args.neuron_sequences]
    tokens = np.asarray(tokens)[: args.sequences]
    log(f"graph {graph_dir}: {graph.edges_by_kind()}; {tokens.shape[0]} x {tokens.shape[1]} tokens of the build")
    summary = {"setting": vars(args)}
    rows, per_pair = run_designs(model, saes, graph, tokens, args)
    write_csv(out / "designs_intervention.csv", rows)
    write_csv(out / "designs_intervention_pairs.csv", per_pair)
    summary["intervention"] = summarise_designs(rows)
    log(f"intervention: {json.dumps(summary['intervention'])}")
    summary["stimulus"] = run_stimulus(model, saes, out, args.seed)
    log(f"stimulus: {json.dumps(summary['stimulus'], default=float)}")
    summary["neurons"] = run_neurons(model, saes, graph, atlas, neuron_tokens, args, out)
    log(f"neurons: {json.dumps({k: v for k, v in summary['neurons'].items() if k != 'top_entries'})}")
    summary["wall_s"] = round(time.time() - T0, 1)
    (out / "designs_summary.json").write_text(json.dumps(summary, indent=1, default=float))
    log(f"done in {summary['wall_s']} s")


if __name__ == "__main__":
    main()
