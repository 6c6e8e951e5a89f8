"""Experiment 05: does the graph of experiment 02 predict what steering a feature cascades into
(prediction 9.5), and does compensating along the graph make steering more precise?

    python -m experiments.05_steering.run [--scale cpu|accelerator|smoke] [--work BUILD_FOLDER]

Steered features: sources of the graph's first site, the ones with the most out-edges and a random
set with at least 5 out-edges. Each is clamped (error-preserving) at one position per sequence (its
strongest, as the build clamped it when it measured the graph's edges; read at the same position), to its
90th-percentile activation ("in range", the level the graph's slopes were measured up to) and to 4x
that ("strong"). The observed change of every graph feature at later sites (mean over the clamped
tokens) is compared with `predict_cascade` per token, in five variants: direct edges only, multi-hop,
multi-hop with gating (each carrying pre-activation changes through every feature's activation at its
clean pre-activation and threshold), and multi-hop with gating where features are only bounded below
by 0, and every edge chained on top of the (total-effect) weights; and the direct edges' slopes are
compared with the observed pre-activation changes.
Compensated steering (strong level): keep the 3 strongest direct targets' predicted changes and cancel
the rest with 10 control clamps chosen by least squares on the graph; evaluated on held-out sequences
against naive clamping and against adding the decoder direction alone.
Writes results/cascade.csv, results/compensation.csv, results/summary.md, results/cascade.png and
results/verdict.md.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from experiments.scales import arguments, built_graph
from jfig import Clamp, Steer
from jfig.data import default_corpus, tokens_from
from jfig.sites import site_key
from jfig.steering import cascade_nodes, compare_cascade, compensate, observe_cascade, predict_cascade
from jfig.steering.observe import fit_scores

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
SETTINGS = {  # steered features (top by out-degree + random), sequences of 64 tokens, compensated features
    "smoke": dict(top=2, random=1, sequences=4, compensated=1),
    "cpu": dict(top=10, random=10, sequences=16, compensated=5),
    "accelerator": dict(top=50, random=50, sequences=128, compensated=20),
}
# the graph's targets were read before the activation function (read="pre"), so predictions carry
# pre-activation changes through each feature's activation (pre=, threshold=); one variant only
# bounds only (baseline=), treating every summed pre-activation change as a feature change. Edges measured
# by clamping are total effects, so multi-hop composes paths only into untested site pairs (compose=
# "untested", the default); "every edge chained" composes all paths on top of the total effects.
VARIANTS = {"direct": dict(hops=1, gating=False), "multi-hop": dict(hops=None, gating=False),
            "multi-hop + gating": dict(hops=None, gating=True),
            "multi-hop + gating, bounds only": dict(hops=None, gating=True, activation=False),
            "every edge chained": dict(hops=None, gating=True, compose="all")}
LEVELS = {"in range": 1.0, "strong": 4.0}


def steered_features(graph, site: str, top: int, n_random: int, seed: int = 0) -> dict[int, str]:
    e = graph.edges.to_pydict()
    degree: dict = {}
    for s, f, k in zip(e["source_site"], e["source"], e["kind"]):
        if s == site and k != "gating":
            degree[f] = degree.get(f, 0) + 1
    by_degree = sorted(degree, key=lambda f: -degree[f])
    rest = [f for f in by_degree[top:] if degree[f] >= 5]
    rng = np.random.default_rng(seed)
    picked = {int(f): "most out-edges" for f in by_degree[:top]}
    picked.update({int(f): "random" for f in rng.choice(rest, min(n_random, len(rest)), replace=False)})
    return picked


def nll(model, tokens, edits=()) -> float:
    logits = model.run(tokens, edits=edits).logits
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return float(-jnp.take_along_axis(lp, jnp.asarray(tokens)[:, 1:, None], -1).mean())


def observed_vector(obs, keys, mask) -> np.ndarray:
    return np.asarray([obs.changes[s][..., f][mask].mean() for s, f in keys])


def one_position_per_row(f: np.ndarray) -> np.ndarray:
    """bool [batch, seq]: each row's strongest position of the feature (activations f [batch, seq]),
    where it is active: where the build clamped it when it measured the graph's edges (clamp_at
    "single"), read at the same position."""
    mask = np.zeros(f.shape, bool)
    rows = np.flatnonzero((f > 0).any(1))
    mask[rows, np.argmax(f[rows], axis=1)] = True
    return mask


def pre_activation_changes(model, saes, edits, tokens, keys, mask) -> np.ndarray:
    """Mean observed change of each key's encoder pre-activation at the masked tokens."""
    sites = tuple(dict.fromkeys(s for s, _ in keys))
    clean = model.run(tokens, capture=sites, logits=False).cache
    edited = model.run(tokens, edits=edits, capture=sites, logits=False).cache
    d = {s: np.asarray(saes[s].pre_activations(edited[s]) - saes[s].pre_activations(clean[s])) for s in sites}
    return np.asarray([d[s][..., f][mask].mean() for s, f in keys])


def main():
    ap = arguments(__doc__.splitlines()[0], str(HERE / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    graph, model, saes = built_graph(args)          # experiment 02's graph and the SAEs it was built with
    cfg = SETTINGS[args.scale]
    corpus = default_corpus(model, n_samples=256)
    seq_len = int(graph.manifest["statistics"].get("seq_len") or 64)
    tokens = tokens_from(corpus, model, seq_len, seed=2, max_tokens=cfg["sequences"] * seq_len)
    held_out = tokens_from(corpus, model, seq_len, seed=3, max_tokens=cfg["sequences"] * seq_len)
    nodes = cascade_nodes(graph)
    site = sorted(saes, key=site_key)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, pooled = [], defaultdict(lambda: ([], []))     # (variant, level, group) -> (predicted, observed) lists

    def pool(variant, level, group, p, o):
        for g in (group, "all", start):
            pooled[(variant, level, g)][0].append(p), pooled[(variant, level, g)][1].append(o)

    share_on_edges = {lv: [] for lv in LEVELS}
    steered = steered_features(graph, site, cfg["top"], cfg["random"])
    for feature, group in steered.items():
        clean = observe_cascade(model, saes, (), tokens)
        f = clean.clean[site][..., feature]
        if (f > 0).sum() < 4:
            logging.info("skip %s#%d: active on %d tokens", site, feature, int((f > 0).sum()))
            continue
        hi = float(np.quantile(f[f > 0], 0.9))
        mask = one_position_per_row(f)
        at_start = float(mask[:, 0].sum() / mask.sum())      # share of the clamps at the sequence-start token
        start = "clamped at position 0 in some rows" if at_start > 0 else "never clamped at position 0"
        later = [k for k in nodes if site_key(k[0]) > site_key(site)]
        base, pre, thr = clean.clean_columns(nodes, mask)                             # [n, N] each
        for level, factor in LEVELS.items():
            value = factor * hi
            edit = Clamp(saes[site], feature, value, positions=mask)
            obs = observe_cascade(model, saes, edit, tokens, positions=mask)
            o = observed_vector(obs, later, mask)
            # the graph's slopes themselves, before any activation: direct edges against pre-activation changes
            w = predict_cascade(graph, {(site, feature): 1.0}, hops=1, gating=False)
            p_pre = np.asarray([float(w.get(k, 0.0)) for k in later]) * float((value - f[mask]).mean())
            o_pre = pre_activation_changes(model, saes, edit, tokens, later, mask)
            fit_pre = fit_scores(p_pre, o_pre)
            pool("pre-activations, direct", level, group, p_pre, o_pre)
            on_edge = p_pre != 0                                   # later features with an edge from the steered one
            pool("pre-activations, edge targets only", level, group, p_pre[on_edge], o_pre[on_edge])
            share_on_edges[level].append(float(np.sum(o_pre[on_edge] ** 2) / np.sum(o_pre ** 2)))
            rows.append(dict(feature=feature, group=group, at_position_0=round(at_start, 3), level=level,
                             variant="pre-activations, direct", tokens=int(mask.sum()),
                             value=round(value, 4), r2=fit_pre.r2, r2_linear=fit_pre.r2_linear,
                             spearman=fit_pre.spearman, n=fit_pre.n, observed_rms=float("nan")))
            for name, kw in VARIANTS.items():
                kw = dict(kw)
                model_kw = dict(pre=pre, threshold=thr) if kw.pop("activation", True) else dict(baseline=base)
                pred = predict_cascade(graph, {(site, feature): value - f[mask]}, **kw, **model_kw)
                p = np.asarray([pred[k].mean() if k in pred else 0.0 for k in later])
                fit = compare_cascade(dict(zip(later, p)), dict(zip(later, o)))
                pool(name, level, group, p, o)
                rows.append(dict(feature=feature, group=group, at_position_0=round(at_start, 3), level=level, variant=name, tokens=int(mask.sum()), value=round(value, 4),
                                 r2=fit.r2, r2_linear=fit.r2_linear, spearman=fit.spearman, n=fit.n,
                                 observed_rms=float(np.sqrt(np.mean(o ** 2)))))
            logging.info("%s#%d %s: r2 %s", site, feature, level,
                         {r["variant"]: round(r["r2"], 3) for r in rows[-len(VARIANTS):]})
    with open(out / "cascade.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader(), w.writerows(rows)
    pooled_fit = {key: fit_scores(np.concatenate(p), np.concatenate(o)) for key, (p, o) in pooled.items() if p}
    (out / "pooled.json").write_text(json.dumps([dict(variant=v, level=lv, sources=g, **asdict(f))
                                                 for (v, lv, g), f in pooled_fit.items()], indent=1) + "\n")
    (out / "edge_share.json").write_text(json.dumps({lv: {"mean": float(np.mean(v)), "per_feature": v}
                                                      for lv, v in share_on_edges.items() if v}, indent=1) + "\n")
    # compensation on the random sources (the most-connected ones are sequence-start features, clamped at
    # position 0, whose cascades the graph does not predict: see the summary)
    randoms = [f for f, g in steered.items() if g == "random"][:cfg["compensated"]]
    comp_rows = compensation(model, saes, graph, site, held_out, nodes, randoms)
    with open(out / "compensation.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(comp_rows[0]))
        w.writeheader(), w.writerows(comp_rows)
    write_summary(out, rows, pooled_fit, comp_rows, graph, site, share_on_edges)


def compensation(model, saes, graph, site, tokens, nodes, features) -> list[dict]:
    """Naive clamp vs compensated clamp vs decoder-direction steering, on held-out tokens."""
    clean = observe_cascade(model, saes, (), tokens)
    clean_nll = nll(model, tokens)
    later = [k for k in nodes if site_key(k[0]) > site_key(site)]
    rows = []
    for feature in features:
        f = clean.clean[site][..., feature]
        if (f > 0).sum() < 4:
            continue
        value = 4.0 * float(np.quantile(f[f > 0], 0.9))
        mask = one_position_per_row(f)
        delta = float((value - f[mask]).mean())
        e = graph.edges.filter(np.asarray([(s == site and x == feature and k == "excitatory")
                                           for s, x, k in zip(graph.edges["source_site"].to_pylist(),
                                                              graph.edges["source"].to_pylist(),
                                                              graph.edges["kind"].to_pylist())]))
        order = np.argsort(-e["weight"].to_numpy())[:3]
        intended = [(e["target_site"][int(i)].as_py(), e["target"][int(i)].as_py()) for i in order]
        base = clean.clean_columns(nodes, mask)[0].mean(0)
        # side effects that can happen: features active where the clamp applies (TopK keeps the others off)
        active = [k for k, b in zip(nodes, base) if b > 0 and site_key(k[0]) > site_key(site)]
        comp = compensate(graph, {(site, feature): delta}, intended=intended, n_controls=10, baseline=base,
                          off_target=active)
        clamp = Clamp(saes[site], feature, value, positions=mask)
        methods = {"naive clamp": (clamp,),
                   "compensated clamp": (clamp, *comp.edits(saes, clean.clean, positions=mask)),
                   "decoder direction": (Steer(site, saes[site].W_dec[feature], delta, positions=mask),)}
        for name, edits in methods.items():
            obs = observe_cascade(model, saes, edits, tokens, positions=mask)
            o = dict(zip(later, observed_vector(obs, later, mask)))
            want = np.asarray([o[k] for k in intended])
            off = np.asarray([v for k, v in o.items() if k not in intended])
            off_rms = float(np.sqrt(np.mean(off ** 2)))
            rows.append(dict(feature=feature, method=name, intended_change=float(want.mean()),
                             off_target_rms=off_rms, precision=float(abs(want.mean()) / off_rms) if off_rms else np.nan,
                             loss_change=nll(model, tokens, edits) - clean_nll,
                             predicted_off_target_rms=comp.off_target_compensated if "compensated" in name
                             else comp.off_target_naive if name == "naive clamp" else np.nan))
        logging.info("compensation %s#%d: %s", site, feature,
                     {r["method"]: round(r["precision"], 3) for r in rows[-3:]})
    return rows


def write_summary(out: Path, rows, pooled, comp_rows, graph, site, share_on_edges) -> None:
    lines = ["# Experiment 05: graph-guided steering", "",
             f"Graph: {graph.n_nodes} features, {graph.n_edges} edges; steered site {site}.", "",
             "## Cascade prediction (pooled over steered features)", "",
             "R² is the coefficient of determination of the raw prediction (1 − SS_res/SS_tot over the mean changes "
             "of every graph feature at later sites, pooled); r² of a linear fit and the Spearman correlation beside it.", "",
             "| steered features | level | variant | R² | linear r² | Spearman | features × steered |",
             "|---|---|---|---|---|---|---|"]
    for (variant, level, group), fit in sorted(pooled.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        lines.append(f"| {group} | {level} | {variant} | {fit.r2:.3f} | {fit.r2_linear:.3f} | {fit.spearman:.3f} | "
                     f"{fit.n} |")
    lines += ["", "The pre-activation rows compare the direct edges' slopes with the observed change of every later "
              "feature's encoder pre-activation (before TopK): how well the weights themselves predict, with no "
              "activation function; 'edge targets only' keeps the features with an edge from the steered feature. "
              "Share of the observed pre-activation change (Σ o²) that falls on edge targets, mean over steered "
              "features: " + ", ".join(f"{lv} {np.mean(v):.3f}" for lv, v in share_on_edges.items() if v) + ".",
              "", "## Per steered feature (multi-hop + gating)", "",
              "| feature | level | clamped tokens | at position 0 | R² | linear r² | Spearman |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['feature']} ({r['group']}) | {r['level']} | {r['tokens']} | {r['at_position_0']:.2f} | {r['r2']:.3f} | "
              f"{r['r2_linear']:.3f} | {r['spearman']:.3f} |" for r in rows if r["variant"] == "multi-hop + gating"]
    lines += ["", "## Compensated steering (held-out sequences, strong level)", "",
              "Intended: the 3 strongest excitatory targets of the steered feature; off-target RMS over every other "
              "graph feature at later sites; controls: 10 features active at the clamped tokens, clamped to clean + u "
              "(u by least squares on the graph's total effects).", "",
              "| feature | method | intended change | off-target RMS | precision | loss change (nats/token) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['feature']} | {r['method']} | {r['intended_change']:.4f} | {r['off_target_rms']:.5f} | "
              f"{r['precision']:.2f} | {r['loss_change']:+.4f} |" for r in comp_rows]
    means = {m: np.mean([r["precision"] for r in comp_rows if r["method"] == m]) for m in
             dict.fromkeys(r["method"] for r in comp_rows)}
    lines += ["", "Mean precision: " + ", ".join(f"{m} {v:.2f}" for m, v in means.items()), ""]
    (out / "summary.md").write_text("\n".join(lines))
    full = pooled.get(("multi-hop + gating", "in range", "all"))
    strong = pooled.get(("multi-hop + gating", "strong", "all"))
    rand = {lv: pooled.get(("multi-hop + gating", lv, "never clamped at position 0")) for lv in LEVELS}
    ok = full is not None and full.r2 >= 0.5
    (out / "verdict.md").write_text("\n".join([
        "# Prediction 9.5: the interaction graph predicts steering side effects", "",
        "Statistic: R² of the graph's predicted mean changes (multi-hop with gating, activation bounds) against the "
        "observed mean changes of every graph feature at later sites, pooled over the steered features. Null: "
        "R² = 0 (predicting no change). Threshold: R² >= 0.5.", "",
        f"- in range: R² {full.r2:.3f} (linear r² {full.r2_linear:.3f}, Spearman {full.spearman:.3f})" if full else "",
        f"- strong (4x): R² {strong.r2:.3f} (linear r² {strong.r2_linear:.3f}, Spearman {strong.spearman:.3f})" if strong else "",
        *[f"- sources never clamped at the sequence-start token, {lv}: R² {f.r2:.3f} (linear r² {f.r2_linear:.3f})"
          for lv, f in rand.items() if f],
        "", f"**Verdict: {'supported' if ok else 'not supported'}** on this graph.", ""]))
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    names = list(VARIANTS) + ["pre-activations, direct", "pre-activations, edge targets only"]
    for j, level in enumerate(LEVELS):
        key = "never clamped at position 0"
        vals = [max(pooled[(v, level, key)].r2, -1.0) if (v, level, key) in pooled else np.nan for v in names]
        ax.bar(np.arange(len(names)) + 0.38 * j, vals, width=0.38, label=level)
    ax.set_xticks(np.arange(len(names)) + 0.19, names, fontsize=8, rotation=30, ha="right")
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set_ylabel("R², sources never clamped at position 0\n(pooled; floored at -1)")
    ax.legend()
    fig.savefig(out / "cascade.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
