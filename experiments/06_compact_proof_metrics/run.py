"""Experiment 06: do the cheap interaction metrics predict the causal graph?

    jfig demo --out DEMO                      # once: a SmolLM2-135M graph with its atlas and build folder
    python -m experiments.06_compact_proof_metrics.run --graph DEMO/graph [--extra-pairs 48]

Two comparisons on a saved graph (its SAEs from jfig's cache, its atlas and build folder beside it):

1. First-order edges. Every tested (source, target) pair of the dense build (each source against
   every feature of the next site; the measured slope of every pair read from the build's blocks)
   gets the metrics defined for two features at different sites: the atlas's co-activation rate,
   P(target | source) and PMI, the activation correlation and binned mutual information
   (feature_distribution), and the direct-path decoder alignment cos(e_j, d_i) that candidate
   selection orders pairs by. Labels: the graph's excitatory and inhibitory edges; non-edges are
   the other tested pairs.
2. Gating hyperedges (source i, modulator k -> target j). The pair metrics of the compact-proof
   view (neuron ratio expectation, neuron and MLP interaction error, Hadamard overlap, QK interaction,
   query overlap) are defined for two features in one residual stream, which is what a gating pair
   (i, k) at one site is; the factorial gating statistic f_j(hi,hi) - f_j(hi,lo) - f_j(lo,hi) +
   f_j(lo,lo) is the causal counterpart of the MLP's 2x2 interaction error. Pairs: those the build
   tested (label: any of their triples a gating edge), and an extension measured here: random
   pairs of the graph's sources at each site, each against every feature of the next site
   (factorial, the build's inputs, levels and positions; tau from a random-modulator null; Bonferroni
   over the extension's triples), label: at least one gated target.

Each metric is scored with `jfig.interactions.metric_predictions` (ROC AUC with DeLong interval and
Mann-Whitney p, Spearman with |weight|, precision at k against the base rate). Writes results/*.csv,
results/summary.md and results/interactions.png (the ranked gating-pair interactions by location).
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
import pyarrow.parquet as pq
from scipy import stats as sps

import jfig
from jfig.atlas import Atlas
from jfig.data import tokens_from
from jfig.interactions import (edge_labels, feature_distribution, first_reader, metric_predictions, neuron_interactions,
                               pair_frequency, pair_summary, plot_interactions, predictions_markdown, qk_terms,
                               query_overlap, rank_interactions)
from jfig.interactions.readin import feature_directions
from jfig.measure import clean_prefix, measure_gating
from jfig.pipeline import BuildOptions, find_atlas
from jfig.pipeline.behavior import cached_saes_for
from jfig.pipeline.dense import build_sites
from jfig.pipeline.stages import pvalues
from jfig.saes.geometry import decoder_alignment
from jfig.sites import parse_site, site_key
from jfig.stats import decide, null_threshold

HERE = Path(__file__).parent
OFFSETS = (0, 1, 2, 4, 8)
SKIP = 0                  # data metrics include the sequence-start token: the graph's clamps reach it too
GATING_METRICS = ("neuron_expected", "neuron_error", "mlp_error", "mlp_error_score", "hadamard", "qk_interaction",
                  "query_overlap", "mlp_error_path", "hadamard_path", "qk_interaction_path", "mi", "corr",
                  "cooccurrence", "pmi", "decoder_cos")
FIRST_METRICS = ("cooccurrence", "p_target_given_source", "pmi", "corr", "abs_corr", "mi", "alignment",
                 "abs_alignment")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graph", required=True, help="graph folder of a dense build (e.g. DEMO/graph)")
    p.add_argument("--build", default=None, help="its build folder (default: GRAPH/../build)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--metric-tokens", type=int, default=4096, help="tokens of the neuron metrics' data pass")
    p.add_argument("--bins", type=int, default=3, help="bins of the first-order mutual information")
    p.add_argument("--extra-pairs", type=int, default=48, help="random gating pairs measured per site (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--pairs-out", default=None, help="also write every first-order pair's metrics here (Parquet; "
                                                     "about 30 MB)")
    return p.parse_args()


# ---------------------------------------------------------------- 1. first-order pairs

def tested_first_order(build: Path, saes: dict) -> pa.Table:
    """Every tested (source, target) pair of a dense build with its measured slope (`weight`)."""
    sites = build_sites(saes)
    parts = []
    for f in sorted((build / "blocks").glob("block_*.npz")):
        z = np.load(f)
        parts.append({"site_a": np.asarray(sites, object)[z["source_site"]], "feature_a": z["source"].astype(np.int64),
                      "site_b": np.asarray(sites, object)[z["target_site"]], "feature_b": z["target"].astype(np.int64),
                      "weight": z["mean"].astype(np.float64)})
    return pa.table({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def first_order_metrics(pairs: pa.Table, model, saes: dict, atlas: Atlas, tokens, bins: int) -> pa.Table:
    """The pairs with every first-order metric column."""
    cols = {c: pairs[c].to_numpy(zero_copy_only=False) for c in pairs.column_names}
    n = len(cols["site_a"])
    out = {k: np.full(n, np.nan) for k in FIRST_METRICS}
    out["cooccurrence"] = pair_frequency(atlas, cols["site_a"], cols["feature_a"], cols["site_b"], cols["feature_b"])
    for s, t in sorted({(a, b) for a, b in zip(cols["site_a"], cols["site_b"])}, key=lambda p: site_key(p[0])):
        rows = np.flatnonzero((cols["site_a"] == s) & (cols["site_b"] == t))
        src, tgt = np.unique(cols["feature_a"][rows]), np.unique(cols["feature_b"][rows])
        r = np.searchsorted(src, cols["feature_a"][rows])
        c = np.searchsorted(tgt, cols["feature_b"][rows])
        ti, tj = atlas.tracked_index(s, src), atlas.tracked_index(t, tgt)
        p_cond = atlas.conditional_probability(s, t)[np.ix_(ti, tj)]
        pmi = atlas.pmi(s, t)[np.ix_(ti, tj)]
        out["p_target_given_source"][rows] = p_cond[r, c]
        out["pmi"][rows] = pmi[r, c]
        _, cos = decoder_alignment(saes[s], saes[t], src, tgt)
        out["alignment"][rows] = cos[r, c]
        t1 = time.time()
        dist = feature_distribution(model, [saes[s], saes[t]], tokens, {s: src, t: tgt}, bins=bins, atlas=atlas,
                                    batch_size=16, skip_positions=SKIP)
        ia, ib = np.arange(len(src)), len(src) + np.arange(len(tgt))
        out["corr"][rows] = dist.corr[np.ix_(ia, ib)][r, c]
        out["mi"][rows] = dist.mi_corrected[np.ix_(ia, ib)][r, c]
        log(f"first order {s} -> {t}: {len(rows):,} pairs, distribution of {len(src)} + {len(tgt)} features in "
            f"{time.time() - t1:.0f} s")
    finite = np.isfinite(out["pmi"])
    lowest = out["pmi"][finite].min() if finite.any() else 0.0
    out["pmi"] = np.where(np.isneginf(out["pmi"]), lowest - 1.0, out["pmi"])     # never together: below every PMI
    out["abs_corr"], out["abs_alignment"] = np.abs(out["corr"]), np.abs(out["alignment"])
    return pa.table({**cols, **out})


# ---------------------------------------------------------------- 2. gating pairs

def gating_metrics(pairs_by_site: dict, model, saes: dict, atlas: Atlas, tokens, target_site: dict):
    """(per-pair metric table, ranked table): for each site's pairs [P, 2], the pair metrics at the first
    MLP / attention that reads the site (the compact-proof definitions), their sums over every layer
    up to the target site (the path the gating statistic is carried along), the distribution and atlas
    metrics and the decoder cosine."""
    parts, ranked = [], []
    for site, pairs in pairs_by_site.items():
        t1 = time.time()
        sae = saes[site]
        last = parse_site(target_site[site]).layer
        rate = atlas.firing_rate(site) + 1e-6
        feats = np.unique(pairs)
        mlps = [neuron_interactions(model, sae, pairs, tokens, layer=L, skip_positions=SKIP, batch_size=16)
                for L in range(first_reader(site, "mlp"), last + 1)]
        heads = [qk_terms(model, sae, feats, layer=L, offsets=list(OFFSETS), weights=rate)
                 for L in range(first_reader(site, "attn"), last + 1)]
        overlaps = [query_overlap(model, sae, feats, layer=L, offsets=list(OFFSETS), weights=rate)
                    for L in range(first_reader(site, "attn"), last + 1)]
        dist = feature_distribution(model, [sae], tokens, {site: feats}, bins=4, atlas=atlas, batch_size=16,
                                    skip_positions=SKIP)
        first = rank_interactions(neurons=mlps[:1], qk=heads[:1], overlaps=overlaps[:1], distribution=dist,
                                  pairs={site: pairs}, distribution_pairs=_pair_cols(site, pairs), atlas=atlas,
                                  per_pair=3)
        path = rank_interactions(neurons=mlps, qk=heads, atlas=atlas, pairs={site: pairs}, per_pair=1)
        ranked.append(rank_interactions(neurons=mlps, qk=heads, overlaps=overlaps, pairs={site: pairs}, atlas=atlas))
        s_first = _by_pair(pair_summary(first), site, pairs)
        s_path = _by_pair(pair_summary(path.filter(pc.is_in(path["metric"], pa.array(
            ["mlp_error", "hadamard", "qk_interaction"]))), how="sum"), site, pairs)
        cols = _pair_cols(site, pairs)
        for m in ("neuron_expected", "neuron_error", "mlp_error", "hadamard", "qk_interaction", "query_overlap",
                  "mi", "corr"):
            cols[m] = s_first[m]
        for m in ("mlp_error", "hadamard", "qk_interaction"):
            cols[f"{m}_path"] = s_path[m]
        cols["cooccurrence"] = mlps[0].cooccurrence
        cols["mlp_error_score"] = np.nan_to_num(cols["mlp_error"]) * mlps[0].cooccurrence   # never together: 0
        cols["pmi"] = np.asarray(atlas.pmi(site, site))[atlas.tracked_index(site, pairs[:, 0]),
                                                         atlas.tracked_index(site, pairs[:, 1])]
        d = np.asarray(feature_directions(sae, feats))
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        pos = np.searchsorted(feats, pairs)
        cols["decoder_cos"] = np.abs((d[pos[:, 0]] * d[pos[:, 1]]).sum(1))
        parts.append(cols)
        log(f"gating metrics at {site}: {len(pairs)} pairs, {len(mlps)} MLPs and {len(heads)} attention layers in "
            f"{time.time() - t1:.0f} s")
    table = pa.table({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    pmi = table["pmi"].to_numpy()
    lowest = np.nanmin(np.where(np.isfinite(pmi), pmi, np.nan)) if np.isfinite(pmi).any() else 0.0
    table = table.set_column(table.schema.get_field_index("pmi"), "pmi", pa.array(np.where(np.isneginf(pmi),
                                                                                            lowest - 1.0, pmi)))
    return table, pa.concat_tables(ranked)


def _pair_cols(site, pairs) -> dict:
    return {"site_a": np.full(len(pairs), site, object), "feature_a": pairs[:, 0].astype(np.int64),
            "site_b": np.full(len(pairs), site, object), "feature_b": pairs[:, 1].astype(np.int64)}


def _by_pair(summary: pa.Table, site: str, pairs: np.ndarray) -> dict:
    """Columns of a pair_summary in the order of `pairs` (NaN where missing)."""
    key = {(int(a), int(b)): r for r, (a, b) in enumerate(zip(summary["feature_a"].to_pylist(),
                                                            summary["feature_b"].to_pylist()))}
    rows = np.asarray([key.get((int(min(a, b)), int(max(a, b))), -1) for a, b in pairs])
    out = {}
    for m in summary.column_names[4:]:
        v = summary[m].to_numpy(zero_copy_only=False).astype(np.float64)
        out[m] = np.where(rows >= 0, v[np.maximum(rows, 0)], np.nan)
    return out


def graph_gating_pairs(build: Path, graph) -> tuple[dict, dict, pa.Table]:
    """The build's tested gating triples: ({site: [P, 2] (source, modulator)}, {site: target site}, the
    per-pair largest |statistic|)."""
    z = np.load(build / "gating.npz")
    same = z["source_site"] == z["modulator_site"]
    by_site, target_site, best = {}, {}, {}
    for ss, s, m, ts, v in zip(z["source_site"][same], z["source"][same], z["modulator"][same],
                               z["target_site"][same], z["mean"][same]):
        key = (str(ss), int(min(s, m)), int(max(s, m)))
        best[key] = max(best.get(key, 0.0), abs(float(v)))
        target_site[str(ss)] = str(ts)
    for (site, a, b) in best:
        by_site.setdefault(site, []).append((a, b))
    by_site = {s: np.asarray(sorted(v), np.int64) for s, v in sorted(by_site.items(), key=lambda kv: site_key(kv[0]))}
    rows = [(s, a, s, b, best[(s, a, b)]) for s, p in by_site.items() for a, b in p]
    w = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("site_a", "feature_a", "site_b", "feature_b",
                                                                "weight"))})
    return by_site, target_site, w


def extension(model, saes: dict, graph, atlas: Atlas, tokens, opts: BuildOptions, per_site: int, seed: int,
              exclude: dict) -> tuple[dict, dict, pa.Table, pa.Table, dict]:
    """Random pairs of the graph's sources at each source site, each measured for gating on every feature
    of the next site. Returns ({site: pairs}, {site: target site}, per-pair weights, the gating edges
    found, a summary)."""
    rng = np.random.default_rng(seed)
    e = graph.edges.to_pylist()
    sources = {}
    for r in e:
        if r["kind"] != "gating":
            sources.setdefault(r["source_site"], set()).add(r["source"])
            sources.setdefault(("target", r["source_site"]), r["target_site"])
    by_site, target_site = {}, {}
    for site in sorted([s for s in sources if isinstance(s, str)], key=site_key):
        feats = np.asarray(sorted(sources[site]), np.int64)
        a, b = np.triu_indices(len(feats), k=1)
        cand = np.stack([feats[a], feats[b]], 1)
        seen = {tuple(p) for p in exclude.get(site, np.zeros((0, 2), int)).tolist()}
        cand = np.asarray([p for p in cand.tolist() if tuple(p) not in seen])
        by_site[site] = cand[np.sort(rng.choice(len(cand), min(per_site, len(cand)), replace=False))]
        target_site[site] = sources[("target", site)]
    prefix = clean_prefix(model, tokens, tuple(by_site), batch_size=opts.batch_size)
    stats, nulls = [], []
    for site, pairs in by_site.items():
        t1 = time.time()
        tsite = target_site[site]
        plist = [((site, int(a)), (site, int(b))) for a, b in pairs]
        kw = dict(method="factorial", positions=opts.positions, clamp_at=opts.clamp_at, read=opts.read, atlas=atlas,
                  inputs_per_pair=opts.inputs_per_source, batch_size=opts.batch_size, seed=opts.seed, clean=prefix,
                  targets={tsite: np.arange(saes[tsite].d_sae)})
        g = measure_gating(model, saes, plist, tokens, keep_per_input=True, **kw)
        null = measure_gating(model, saes, plist, tokens, direction="random", **kw)
        p = pvalues(g.per_input, g.input_weight, opts, opts.seed)
        stats.append((site, pairs, g.mean, p, tsite, g.targets))
        nulls.append(null.mean.reshape(-1))
        log(f"gating extension at {site}: {len(pairs)} pairs x {g.mean.shape[1]} targets (and the null) in "
            f"{time.time() - t1:.0f} s")
    null = np.concatenate(nulls)
    tau = null_threshold(null[np.isfinite(null)], opts.tau_quantile)
    means = np.concatenate([s[2].reshape(-1) for s in stats])
    ps = np.concatenate([s[3].reshape(-1) for s in stats])
    keep = decide(means, ps, alpha=opts.alpha, correction=opts.correction, tau=tau).keep
    edges, weights, start = [], [], 0
    n_gated = {}
    for site, pairs, mean, p, tsite, targets in stats:
        k = keep[start:start + mean.size].reshape(mean.shape)
        start += mean.size
        tfeat = np.asarray([t[1] for t in targets])
        for r, (a, b) in enumerate(pairs):
            weights.append((site, int(a), site, int(b), float(np.nanmax(np.abs(mean[r])))))
            n_gated[(site, int(a), int(b))] = int(k[r].sum())
            for c in np.flatnonzero(k[r]):
                edges.append(dict(source_site=site, source=int(a), modulator_site=site, modulator=int(b),
                                  target_site=tsite, target=int(tfeat[c]), kind="gating", weight=float(mean[r, c])))
    w = pa.table({k: [r[i] for r in weights] for i, k in enumerate(("site_a", "feature_a", "site_b", "feature_b",
                                                                    "weight"))})
    w = w.append_column("n_gated", pa.array([n_gated[(r[0], r[1], r[3])] for r in weights]))
    schema = pa.schema([("source_site", pa.string()), ("source", pa.int64()), ("modulator_site", pa.string()),
                        ("modulator", pa.int64()), ("target_site", pa.string()), ("target", pa.int64()),
                        ("kind", pa.string()), ("weight", pa.float64())])
    summary = dict(tau_gate=float(tau), n_triples=int(means.size), n_gating_edges=len(edges),
                   pairs_with_gating=int(sum(v > 0 for v in n_gated.values())), n_pairs=len(weights))
    return by_site, target_site, w, pa.Table.from_pylist(edges, schema=schema), summary


def start_features(atlas: Atlas) -> dict:
    """{site: set of ids}: sequence-start features, at least half of whose strongest contexts in the atlas
    are at position 0 (the attention-sink token, where the residual norm is largest)."""
    out = {}
    for site in atlas.sites:
        feats = set()
        for f in range(atlas.d_sae[site]):
            pos = [c["position"] for c in atlas.contexts(site, f)]
            if pos and np.mean(np.asarray(pos) == 0) >= 0.5:
                feats.add(f)
        out[site] = feats
    return out


def touches_start(table: pa.Table, start: dict) -> np.ndarray:
    """[rows] whether either feature of a pair is a sequence-start feature."""
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in ("site_a", "feature_a", "site_b", "feature_b")}
    return np.asarray([f in start.get(s, ()) or g in start.get(t, ()) for s, f, t, g in
                       zip(cols["site_a"], cols["feature_a"], cols["site_b"], cols["feature_b"])], bool)


def gating_subsets(table: pa.Table, start: dict) -> dict:
    sink = touches_start(table, start)
    return {"all tested pairs": np.ones(table.num_rows, bool), "with a sequence-start feature": sink,
            "no sequence-start feature": ~sink}


def pruning_recall(table: pa.Table, graph, metrics, subsets: dict, fractions=(0.05, 0.1, 0.25, 0.5)) -> pa.Table:
    """Share of the edges (any kind) kept when only the top fraction of tested pairs by a metric is kept
    (the null: the fraction itself, for a random order)."""
    present, _ = edge_labels(table, graph)
    rows = []
    for name, mask in subsets.items():
        y = present["any"][mask]
        for m in metrics:
            x = np.nan_to_num(table[m].to_numpy(zero_copy_only=False)[mask].astype(np.float64), nan=-np.inf)
            order = np.argsort(-x, kind="stable")
            for f in fractions:
                k = int(round(f * len(x)))
                rows.append(dict(subset=name, metric=m, keep=f, edges=int(y.sum()),
                                 recall=float(y[order[:k]].sum() / max(y.sum(), 1))))
    return pa.Table.from_pylist(rows)


def score(table: pa.Table, edges, kinds, metrics, subsets: dict) -> pa.Table:
    """metric_predictions on each subset of rows ({name: mask}), with a leading `subset` column."""
    parts = []
    for name, mask in subsets.items():
        t = metric_predictions(table.filter(pa.array(mask)), edges, kinds=kinds, metrics=list(metrics))
        parts.append(t.add_column(0, "subset", pa.array([name] * t.num_rows)))
    return pa.concat_tables(parts)


def markdown_by_subset(pred: pa.Table, kinds=None) -> list[str]:
    out = []
    for name in dict.fromkeys(pred["subset"].to_pylist()):
        t = pred.filter(pc.equal(pred["subset"], name))
        if kinds is not None:
            t = t.filter(pc.is_in(t["kind"], pa.array(list(kinds))))
        out += [f"### {name}", "", predictions_markdown(t.drop_columns(["subset"]))]
    return out


def recall_markdown(recall: pa.Table) -> str:
    rows = recall.to_pylist()
    fracs = sorted({r["keep"] for r in rows})
    lines = ["| subset | metric | " + " | ".join(f"top {f:.0%}" for f in fracs) + " |",
             "|---|---|" + "---|" * len(fracs)]
    for (sub, m) in dict.fromkeys((r["subset"], r["metric"]) for r in rows):
        vals = {r["keep"]: r["recall"] for r in rows if (r["subset"], r["metric"]) == (sub, m)}
        lines.append(f"| {sub} | {m} | " + " | ".join(f"{vals[f]:.3f}" for f in fracs) + " |")
    lines.append("| (random order) | | " + " | ".join(f"{f:.3f}" for f in fracs) + " |")
    return "\n".join(lines) + "\n"


def join(metrics: pa.Table, weights: pa.Table) -> pa.Table:
    """metrics with the weights' extra columns, matched on the pair (rows in the same order by construction)."""
    for a, b in (("feature_a", "feature_a"), ("feature_b", "feature_b")):
        assert metrics[a].to_pylist() == weights[b].to_pylist()
    for c in weights.column_names[4:]:
        metrics = metrics.append_column(c, weights[c])
    return metrics


def write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table, path)


def main():
    args = arguments()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    graph_dir = Path(args.graph)
    build = Path(args.build) if args.build else graph_dir.parent / "build"
    graph = jfig.load_graph(graph_dir)
    opts = BuildOptions.from_dict(graph.manifest["options"])
    model = jfig.load_model(args.model)
    saes = {s.site: s for s in cached_saes_for(model, graph.manifest)}
    atlas = Atlas.load(find_atlas(graph_dir))
    st = graph.manifest["statistics"]
    tokens = tokens_from("default", model, st["seq_len"], max_tokens=st["n_sequences"] * st["seq_len"])
    metric_tokens = tokens[: max(1, args.metric_tokens // tokens.shape[1])]
    log(f"graph {graph}; {tokens.shape[0]} x {tokens.shape[1]} tokens (the build's), {metric_tokens.shape[0]} "
        f"sequences for the neuron metrics")
    setting = dict(graph=str(graph_dir), n_tokens=int(tokens.size), neuron_metric_tokens=int(metric_tokens.size),
                   bins_first_order=args.bins, extra_pairs_per_site=args.extra_pairs, seed=args.seed,
                   offsets=list(OFFSETS), edges_by_kind=graph.edges_by_kind())

    # 1. first-order edges over every tested pair
    t1 = time.time()
    tested = tested_first_order(build, saes)
    first = first_order_metrics(tested, model, saes, atlas, tokens, args.bins)
    if args.pairs_out:
        pq.write_table(first, args.pairs_out)
    start = start_features(atlas)
    setting["sequence_start_features"] = {k: len(v) for k, v in start.items()}
    sink = touches_start(first, start)
    subsets = {"all tested pairs": np.ones(first.num_rows, bool), "no sequence-start feature": ~sink}
    sa, sb = first["site_a"].to_numpy(zero_copy_only=False), first["site_b"].to_numpy(zero_copy_only=False)
    for a, b in sorted(set(zip(sa, sb)), key=lambda p: site_key(p[0])):
        subsets[f"{a} -> {b}"] = (sa == a) & (sb == b)
        subsets[f"{a} -> {b}, no sequence-start feature"] = (sa == a) & (sb == b) & ~sink
    pred_first = score(first, graph, ("excitatory", "inhibitory", "any"), FIRST_METRICS, subsets)
    recall = pruning_recall(first, graph, FIRST_METRICS, {k: v for k, v in subsets.items() if "->" not in k})
    write(recall, out / "pruning_recall.csv")
    setting["first_order"] = dict(n_pairs=first.num_rows, seconds=round(time.time() - t1))
    write(pred_first, out / "first_order.csv")
    log(f"first order: {first.num_rows:,} tested pairs scored in {time.time() - t1:.0f} s")

    # 2a. the build's gating pairs
    t1 = time.time()
    by_site, target_site, w = graph_gating_pairs(build, graph)
    gm, ranked = gating_metrics(by_site, model, saes, atlas, metric_tokens, target_site)
    gm = join(gm, w)
    both = gating_subsets(gm, start)
    pred_graph = score(gm, graph, ("gating",), GATING_METRICS, both)
    setting["gating_graph"] = dict(n_pairs=gm.num_rows, seconds=round(time.time() - t1))
    write(gm, out / "gating_graph_pairs.csv")
    write(pred_graph, out / "gating_graph.csv")

    # 2b. the extension: random pairs of the graph's sources, gating on every target of the next site
    pred_ext, ext_summary = None, None
    if args.extra_pairs:
        t1 = time.time()
        ext_sites, ext_target, ext_w, ext_edges, ext_summary = extension(
            model, saes, graph, atlas, tokens, opts, args.extra_pairs, args.seed, by_site)
        em, ranked_ext = gating_metrics(ext_sites, model, saes, atlas, metric_tokens, ext_target)
        em = join(em, ext_w)
        both = gating_subsets(em, start)
        pred_ext = score(em, ext_edges, ("gating",), GATING_METRICS, both)
        write(em, out / "gating_extension_pairs.csv")
        write(pred_ext, out / "gating_extension.csv")
        ranked = pa.concat_tables([ranked, ranked_ext])
        setting["gating_extension"] = dict(**ext_summary, seconds=round(time.time() - t1))
        n_g = em["n_gated"].to_numpy()
        rho = {c: sps.spearmanr(em[c].to_numpy(), n_g, nan_policy="omit") for c in GATING_METRICS}
        setting["gating_extension"]["spearman_with_n_gated"] = {c: [round(float(r.statistic), 4),
                                                                     float(r.pvalue)] for c, r in rho.items()}

    plot_interactions(ranked, top=150, title="interactions of the gating pairs (SmolLM2-135M, demo graph)").savefig(
        out / "interactions.png", dpi=70)
    setting["seconds"] = round(time.time() - T0)
    (out / "setting.json").write_text(json.dumps(setting, indent=1, default=str))
    md = ["# Experiment 06 results", "", f"Setting: `{json.dumps({k: v for k, v in setting.items() if k in ('n_tokens', 'neuron_metric_tokens', 'bins_first_order', 'extra_pairs_per_site', 'seed')})}`", "",
          "## First-order edges (every tested pair)", "",
          *markdown_by_subset(pred_first.filter(pa.array([("->" not in x) for x in pred_first["subset"].to_pylist()]))),
          "## Pruning: edges kept when only the top fraction of pairs by a metric is measured", "",
          recall_markdown(recall),
          "## First-order edges by site pair (any edge)", "",
          *markdown_by_subset(pred_first.filter(pa.array([("->" in x) for x in pred_first["subset"].to_pylist()])),
                              kinds=("any",)),
          "## Gating: the build's tested pairs", "", *markdown_by_subset(pred_graph)]
    if pred_ext is not None:
        md += ["## Gating: random pairs of the graph's sources, every target of the next site", "",
               f"`{json.dumps(ext_summary)}`", "", *markdown_by_subset(pred_ext)]
    (out / "summary.md").write_text("\n".join(md))
    log(f"done; results in {out}")


if __name__ == "__main__":
    main()
