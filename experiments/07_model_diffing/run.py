"""Experiment 07: model diffing. What changes in the interaction graph when SmolLM2-135M is fine-tuned,
and is it more than retraining the SAEs changes?

    python -m experiments.07_model_diffing.run --out DIR

Stages (each writes under DIR and is skipped when its output is already there, so an interrupted run
resumes; build_graph itself resumes block by block):

1. finetune: AdamW (optax) on the MLP matrices (W_gate, W_up, W_down) of layers 7-12 only, on the
   cross-entropy of the answer's first token at the last prompt token of the sentiment suite
   (seed-0 prompts); the behaviour (jfig.behaviors.suite_baseline) on held-out sentiment prompts (seed 1,
   texts seen in training removed) and the next-token loss on default-corpus text, before and after.
   Layers 0-6 are untouched, so blocks.6.hook_resid_post is identical in both models (a built-in control).
2. saes: default SAEs (jfig.default_saes: TopK, d_sae 2048, k 32 at blocks.{6,10,14,18}.hook_resid_post)
   for the base model (seed 0: jfig's cached defaults), the base model again with seed 1 (the null: a
   retrain without any model change) and the fine-tuned model with seed 2 (so base-vs-fine-tuned, like
   the null, compares SAEs that start from different initialisations and token orders).
3. graphs: build_graph on the same tokens and options for base, base-seed-1 and fine-tuned (each with its
   own SAEs), and with the base SAEs for the fine-tuned model and for the base model at measurement seed 1
   (the same-SAE diff and its null; BUILDS).
4. match + diff: graphs of the same SAEs feature by feature; the others through match_features (decoder cosine, activation correlation on the same default-corpus
   tokens, model A's activations for SAE A and model B's for SAE B) and diff_graphs(ratio=2) for
   base vs fine-tuned and base vs base-seed-1; the same counts restricted to edges whose source was
   measured in both builds; most_changed among features matched with similarity >= 0.9 and their atlas
   contexts; whether changed edges touch the features whose activation on the sentiment prompts the
   fine-tune moved most (the base SAE read on base and fine-tuned activations).

Writes DIR/... (models' fine-tuned slice, SAEs, graphs) and, with --results, the small tables and the
figure under experiments/07_model_diffing/results/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from scipy import stats as sps

import jfig
from jfig.behaviors import behavior_suite, suite_baseline, tokenize_suite
from jfig.data import default_corpus, tokens_from
from jfig.graph import diff_graphs
from jfig.pipeline.demo import DEMO_OPTIONS
from jfig.pipeline.view import measured_sources
from jfig.saes import default_saes, match_features
from jfig.saes.defaults import DefaultSAESettings
from jfig.saes.metrics import activation_metrics

from .finetune import MLP_KEYS, finetune, merge, text_loss, with_params

HERE = Path(__file__).parent
SUITE = "sentiment"
LAYERS = (7, 13)                      # fine-tuned: the MLPs of layers 7..12
SITES = DefaultSAESettings().sites    # blocks.{6,10,14,18}.hook_resid_post
# The demo's CPU options, cheaper: 16 sources per site instead of 86 (48 sources against every feature of
# the next site: 98,304 tested pairs per graph), no gating search.
GRAPH_OPTIONS = {**DEMO_OPTIONS, "top_k": 16, "gating": False}
for k in ("gating_max_targets", "gating_max_pairs"):
    GRAPH_OPTIONS.pop(k, None)
CHANGED = ("gained", "lost", "flipped", "strengthened", "weakened")
# graph name: (model, SAE set, options beyond GRAPH_OPTIONS). The first three compare retrained SAEs through
# a matching; the last two keep the base SAEs and compare feature by feature (the fine-tuned model read
# through the base model's SAEs, and its null: the base build again with another measurement seed).
BUILDS = {"base": ("base", "base", {}), "base_seed1": ("base", "base_seed1", {}),
          "finetuned": ("finetuned", "finetuned", {}), "finetuned_base_saes": ("finetuned", "base", {}),
          "base_build_seed1": ("base", "base", {"seed": 1})}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="working folder (fine-tuned weights, SAEs, graphs)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-prompts", type=int, default=256)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--text-sequences", type=int, default=64, help="default-corpus sequences of 64 tokens for the loss")
    p.add_argument("--match-tokens", type=int, default=8192, help="tokens the activation correlations are taken on")
    p.add_argument("--stable", type=float, default=0.9, help="most_changed: least similarity of an edge's features")
    p.add_argument("--results", default=str(HERE / "results"), help="folder for the small tables and figure")
    return p.parse_args()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)


# ------------------------------------------------------------------------------ 1. fine-tune

def stage_finetune(base, out: Path, args):
    folder = out / "finetune"
    weights, metrics_path = folder / "trainable.npz", folder / "metrics.json"
    train = tokenize_suite(base, behavior_suite(SUITE, args.train_prompts, seed=0))
    seen = {p.text for p in behavior_suite(SUITE, args.train_prompts, seed=0).prompts}
    held = [p for p in behavior_suite(SUITE, args.eval_prompts, seed=1).prompts if p.text not in seen]
    test = tokenize_suite(base, jfig.behaviors.as_suite(held))
    text = tokens_from(default_corpus(base), base, 64, seed=123, max_tokens=args.text_sequences * 64)
    if weights.exists() and metrics_path.exists():
        z = np.load(weights)
        model = with_params(base, merge(base.params, {k: jnp.asarray(z[k]) for k in MLP_KEYS}, MLP_KEYS, LAYERS))
        log(f"fine-tuned weights loaded from {weights}")
        return model, json.loads(metrics_path.read_text()), test
    t = time.time()
    before = {"behaviour": suite_baseline(base, test).as_dict(), "text_loss": text_loss(base, text)}
    log(f"base: {before}")
    model, losses = finetune(base, train.tokens, train.last, train.answer, layers=LAYERS, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, log=log)
    after = {"behaviour": suite_baseline(model, test).as_dict(), "text_loss": text_loss(model, text)}
    log(f"fine-tuned: {after}")
    lo, hi = LAYERS
    delta = {k: float(jnp.linalg.norm(model.params["blocks"][k][lo:hi] - base.params["blocks"][k][lo:hi])
                      / jnp.linalg.norm(base.params["blocks"][k][lo:hi])) for k in MLP_KEYS}
    metrics = {"suite": SUITE, "layers": list(range(lo, hi)), "keys": list(MLP_KEYS), "steps": args.steps,
               "lr": args.lr, "batch_size": args.batch_size, "optimizer": "optax.adamw (weight_decay 0)",
               "train_prompts": len(train.tokens), "held_out_prompts": len(test.tokens),
               "text_tokens": int(text.size), "losses": losses.tolist(), "before": before, "after": after,
               "relative_weight_change": delta, "seconds": round(time.time() - t, 1)}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(weights, **{k: np.asarray(model.params["blocks"][k][lo:hi]) for k in MLP_KEYS})
    write_json(metrics_path, metrics)
    return model, metrics, test


# ------------------------------------------------------------------------------ 2. SAEs

def stage_saes(base, tuned, out: Path):
    t = time.time()
    sets = {"base": default_saes(base, progress=False)}            # seed 0: jfig's cached default SAEs
    log(f"base SAEs (jfig's cache) in {time.time() - t:.0f} s")
    for name, model, seed in (("base_seed1", base, 1), ("finetuned", tuned, 2)):
        t = time.time()
        sets[name] = default_saes(model, seed=seed, cache_dir=out / "saes" / name, progress=False)
        log(f"{name} SAEs (seed {seed}) in {time.time() - t:.0f} s")
    return {k: v[0] for k, v in sets.items()}, {k: v[1] for k, v in sets.items()}


# ------------------------------------------------------------------------------ 3. graphs

def stage_graphs(models: dict, saes: dict, base, out: Path):
    tokens = tokens_from(default_corpus(base), base, GRAPH_OPTIONS["seq_len"], seed=0,
                         max_tokens=GRAPH_OPTIONS["max_sequences"] * GRAPH_OPTIONS["seq_len"])
    graphs, seconds = {}, {}
    for name, (model_name, sae_name, extra) in BUILDS.items():
        build = out / "graphs" / name
        t = time.time()
        if (build / "graph").exists():
            graphs[name] = jfig.load_graph(build / "graph")
        else:
            graphs[name] = jfig.build_graph(models[model_name], saes[sae_name], tokens, out_dir=build,
                                             progress=False, **{**GRAPH_OPTIONS, **extra})
        seconds[name] = round(time.time() - t, 1)
        log(f"graph {name}: {graphs[name].summary()} ({seconds[name]} s)")
    return graphs, seconds


# ------------------------------------------------------------------------------ 4. matching and diff

def site_activations(model, tokens, batch: int = 16) -> dict[str, np.ndarray]:
    """{site: [rows, d]} at every SAE site (position 0 dropped)."""
    out = {s: [] for s in SITES}
    for i in range(0, len(tokens), batch):
        cache = model.run(jnp.asarray(tokens[i:i + batch]), capture=SITES, stop_at=SITES[-1], logits=False).cache
        for s in SITES:
            out[s].append(np.asarray(cache[s][:, 1:]).reshape(-1, cache[s].shape[-1]))
    return {s: np.concatenate(v) for s, v in out.items()}


def suite_feature_shift(base, tuned, sae_set, test) -> dict[str, np.ndarray]:
    """{site: [d_sae]}: mean activation of each base-SAE feature on the held-out suite prompts' positions
    (position 0 and the padding left out) under the fine-tuned model minus under the base model."""
    valid = test.valid.copy()
    valid[:, 0] = False
    shift = {}
    for sae in sae_set:
        means = []
        for m in (base, tuned):
            x = m.run(jnp.asarray(test.tokens), capture=(sae.site,), stop_at=sae.site, logits=False).cache[sae.site]
            f = np.asarray(sae.encode(x))[valid]
            means.append(f.mean(0))
        shift[sae.site] = means[1] - means[0]
    return shift


def matchings(saes, acts: dict, pair: tuple[str, str], method: str, act_model: dict):
    a, b = pair
    out = {}
    for sa, sb in zip(saes[a], saes[b]):
        out[sa.site] = match_features(sa, sb, method=method, min_similarity=0.5,
                                      activations=acts[act_model[a]][sa.site],
                                      activations_b=acts[act_model[b]][sb.site])
    return out


def status_counts(table: pa.Table) -> dict[str, int]:
    st = table["status"].to_pylist()
    return {s: st.count(s) for s in ("same", *CHANGED, "unmatched", "untested")}


def changed_fraction(counts: dict) -> float:
    n = sum(counts[s] for s in ("same", *CHANGED))
    return sum(counts[s] for s in CHANGED) / n if n else float("nan")


def contexts(graph, site: str, feature: int, n: int = 2) -> str:
    nodes = graph.nodes
    rows = np.flatnonzero((np.asarray(nodes["site"].to_pylist(), object) == site)
                          & (nodes["feature"].to_numpy(zero_copy_only=False) == feature))
    if not len(rows):
        return ""
    c = json.loads(nodes["top_contexts"][int(rows[0])].as_py() or "[]")
    return " | ".join(x["text"].replace("\n", "⏎").replace("|", "/")[-36:] for x in c[:n])


def shift_rank(shift: dict) -> dict[str, np.ndarray]:
    """{site: percentile [d_sae] of each feature's |shift| among its site's features (1 = moved most)}."""
    return {s: sps.rankdata(np.abs(v)) / len(v) for s, v in shift.items()}


def concentration(table: pa.Table, ranks: dict) -> dict:
    """Do changed edges touch the features the fine-tune moved on the suite prompts? The endpoint score of
    an edge is the larger percentile of |shift| of its source and target (base-SAE numbering); AUC of
    changed against same edges (Mann-Whitney), among edges whose features are matched."""
    t = table.filter(pc.invert(pc.is_in(table["status"], pa.array(["unmatched", "untested"]))))
    ss, s, ts, tt, st = (t[c].to_pylist() for c in ("source_site", "source", "target_site", "target", "status"))
    score = np.array([max(ranks[a][x], ranks[b][y]) for a, x, b, y in zip(ss, s, ts, tt)], float)
    changed = np.array([x in CHANGED for x in st], bool)
    out = {"n_changed": int(changed.sum()), "n_same": int((~changed).sum()), "auc": float("nan"), "p": float("nan"),
           "mean_score_changed": float("nan"), "mean_score_same": float("nan")}
    if changed.any() and (~changed).any():
        u = sps.mannwhitneyu(score[changed], score[~changed], alternative="two-sided")
        out.update(auc=float(u.statistic / (changed.sum() * (~changed).sum())), p=float(u.pvalue),
                   mean_score_changed=float(score[changed].mean()), mean_score_same=float(score[~changed].mean()))
    return out


def main():
    args = arguments()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    timings = {}
    base = jfig.load_model()
    log(f"model: {base.config.name}, {base.config.n_layers} layers")

    t = time.time()
    tuned, ft_metrics, test = stage_finetune(base, out, args)
    timings["finetune"] = round(time.time() - t, 1)
    t = time.time()
    saes, manifests = stage_saes(base, tuned, out)
    timings["saes"] = round(time.time() - t, 1)
    models = {"base": base, "base_seed1": base, "finetuned": tuned}
    t = time.time()
    graphs, graph_seconds = stage_graphs(models, saes, base, out)
    timings["graphs"] = round(time.time() - t, 1)

    analyse(args, base, tuned, test, saes, manifests, graphs, {n: out / "graphs" / n / "graph" for n in graphs},
            graph_seconds, ft_metrics, timings, res)


def analyse(args, base, tuned, test, saes, manifests, graphs, graph_dirs, graph_seconds, ft_metrics, timings, res):
    """Stage 4: matchings, diffs, concentration; the tables, setting.json and the figure under `res`."""
    t = time.time()
    match_tokens = tokens_from(default_corpus(base), base, 64, seed=7, max_tokens=args.match_tokens)
    acts = {"base": site_activations(base, match_tokens), "finetuned": site_activations(tuned, match_tokens)}
    act_model = {"base": "base", "base_seed1": "base", "finetuned": "finetuned"}
    shift = suite_feature_shift(base, tuned, saes["base"], test)
    ranks = shift_rank(shift)
    sources = {n: measured_sources(graph_dirs[n], g) for n, g in graphs.items()}
    rows, match_rows, top_rows, conc_rows = [], [], [], []
    fits = [{"sae": "base", "site": sae.site, "model": name, **activation_metrics(sae, acts[name][sae.site])}
            for sae in saes["base"] for name in ("base", "finetuned")]
    pairs = [("finetuned", "decoder"), ("finetuned", "activation"), ("base_seed1", "decoder"),
             ("base_seed1", "activation"), ("finetuned_base_saes", "same SAEs"), ("base_build_seed1", "same SAEs")]
    for other, method in pairs:
            m = None if method == "same SAEs" else matchings(saes, acts, ("base", other), method, act_model)
            for site, fm in (m or {}).items():
                sim = fm.similarity[fm.match >= 0]
                match_rows.append({"comparison": f"base vs {other}", "method": method, "site": site,
                                   "matched": fm.n_matched, "of": fm.d_sae_a,
                                   "matched_fraction": fm.n_matched / fm.d_sae_a,
                                   "median_similarity_matched": float(np.median(sim)) if len(sim) else float("nan"),
                                   "matched_at_0.9": int((sim >= 0.9).sum())})
            plain = diff_graphs(graphs["base"], graphs[other], matching=m, ratio=2.0)
            d = diff_graphs(graphs["base"], graphs[other], matching=m, ratio=2.0,
                            measured=(sources["base"], sources[other]))
            for scope, table in (("all edges", plain.table), ("untested apart", d.table)):
                c = status_counts(table)
                rows.append({"comparison": f"base vs {other}", "matching": method, "scope": scope, **c,
                             "changed_fraction": changed_fraction(c)})
                conc = concentration(table, ranks)
                conc_rows.append({"comparison": f"base vs {other}", "matching": method, "scope": scope, **conc})
            top = d.most_changed(20, min_similarity=args.stable)
            n_stable = int(pc.sum(pc.and_(pc.invert(pc.is_in(d.table["status"], pa.array(["unmatched", "untested"]))),
                                          pc.greater_equal(d.table["similarity"], args.stable))).as_py() or 0)
            for r in top.to_pylist():
                top_rows.append({"comparison": f"base vs {other}", "matching": method,
                                 "edge": f"{r['source_site'].split('.')[1]}#{r['source']} -> "
                                         f"{r['target_site'].split('.')[1]}#{r['target']}",
                                 "b_ids": f"#{r['source_b']} -> #{r['target_b']}",
                                 "weight_a": r["weight_a"], "weight_b": r["weight_b"], "status": r["status"],
                                 "similarity": r["similarity"],
                                 "source_shift_pct": float(ranks[r["source_site"]][r["source"]]),
                                 "target_shift_pct": float(ranks[r["target_site"]][r["target"]]),
                                 "source_contexts": contexts(graphs["base"], r["source_site"], r["source"]),
                                 "target_contexts": contexts(graphs["base"], r["target_site"], r["target"]),
                                 "stable_edges": n_stable})
            log(f"base vs {other} ({method}): {d.summary()}")
    timings["match_and_diff"] = round(time.time() - t, 1)
    timings["total_this_run"] = round(time.time() - T0, 1)

    # ---- tables
    for name, table in (("base_sae_fit", fits), ("diff_counts", rows), ("matching", match_rows), ("most_changed", top_rows),
                        ("concentration", conc_rows)):
        if table:
            pacsv.write_csv(pa.Table.from_pylist(table), res / f"{name}.csv")
    top_shift = []
    for site, v in shift.items():
        for f in np.argsort(-np.abs(v))[:5]:
            top_shift.append({"site": site, "feature": int(f), "shift": float(v[f]),
                              "contexts": contexts(graphs["base"], site, int(f))})
    pacsv.write_csv(pa.Table.from_pylist(top_shift), res / "suite_shift_top.csv")
    setting = {"graph_options": GRAPH_OPTIONS, "sites": list(SITES), "finetune": {k: v for k, v in ft_metrics.items()
                                                                              if k != "losses"},
               "finetune_loss_first_last": [ft_metrics["losses"][0], ft_metrics["losses"][-1]],
               "sae_metrics": {k: v["metrics"] for k, v in manifests.items()},
               "graphs": {n: {"edges": g.n_edges, "nodes": g.n_nodes, "seconds": graph_seconds[n],
                              "sources": {s: len(v) for s, v in sources[n].items()}} for n, g in graphs.items()},
               "suite_shift_abs_mean": {s: float(np.abs(v).mean()) for s, v in shift.items()},
               "match_tokens": int(match_tokens.size), "timings_s": timings}
    write_json(res / "setting.json", setting)
    figure(rows, res / "diff_counts.png")
    log(f"done: {timings}")


def figure(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, scope in zip(axes, ("all edges", "untested apart")):
        sel = [r for r in rows if r["scope"] == scope]
        short = {"finetuned": "fine-tuned", "base_seed1": "base seed 1", "finetuned_base_saes": "fine-tuned",
                 "base_build_seed1": "base build\nseed 1"}
        labels = [f"{short[r['comparison'].replace('base vs ', '')]}\n({r['matching']})" for r in sel]
        bottom = np.zeros(len(sel))
        for status in ("same", *CHANGED, "unmatched", "untested"):
            v = np.array([r[status] for r in sel], float)
            ax.bar(labels, v, bottom=bottom, label=status)
            bottom += v
        ax.set_title(scope)
        ax.tick_params(axis="x", labelsize=7, rotation=60)
    axes[0].set_ylabel("edges in either graph")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
