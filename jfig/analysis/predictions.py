"""Three falsifiable predictions about an interaction graph, each with its statistic, its null and a
verdict ("supported", "not supported" or "inconclusive" with the reason).

1. Sparsity: fewer than 1 % of the tested pairs are edges. Statistic: the edge fraction with a
   95 % Wilson interval (scipy.stats.binomtest). Null: a dense mesh, fraction >= 1 %. Supported when
   the interval lies below 1 %, not supported when it lies above, inconclusive when it straddles.
2. Hubs: the degree distribution is heavy-tailed and its hubs matter. Statistics: the likelihood
   ratio of a power law (and of a log-normal) against an exponential tail for the out-degrees
   (`degree_fits`; null: an exponential, light tail), and the hub-ablation test (null: features of
   matched firing rate, one-sided Mann-Whitney at 0.05). Supported when a heavy tail is preferred
   and hubs move the loss more; not supported when the exponential is preferred or the hub test is
   run and fails; inconclusive when the fits are undecided or the hub test was not run. The
   correlation of degree with firing rate is reported beside it: general-purpose features fire
   often, so a positive correlation is what "hubs are general" predicts.
3. Excitation across layers, inhibition within: the excitatory share of cross-layer edges is above
   one half (one-sided binomial test, null: one half) and the within-layer share is below the
   cross-layer share (one-sided Fisher exact test, null: equal shares), both at 0.05. Inconclusive
   when the graph has no within-layer pairs (no two SAE sites in one layer) or no edges there.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from ..sites import parse_site
from .hubs import degree_table
from .layers import first_order, tested_by_site_pair

SPARSE_BELOW = 0.01
LEVEL = 0.05


def sparsity(n_edges: int, n_tested: int) -> dict:
    """Prediction 1 from the number of first-order edges and of tested pairs."""
    if n_tested <= 0:
        return {"prediction": "sparse graph", "verdict": "inconclusive", "reason": "no pairs were tested",
                "statistic": None}
    ci = stats.binomtest(n_edges, n_tested).proportion_ci(0.95, method="wilson")
    frac = n_edges / n_tested
    if ci.high < SPARSE_BELOW:
        verdict, reason = "supported", f"the 95 % interval lies below {SPARSE_BELOW:.0%}"
    elif ci.low > SPARSE_BELOW:
        verdict, reason = "not supported", f"the 95 % interval lies above {SPARSE_BELOW:.0%}"
    else:
        verdict, reason = "inconclusive", f"the 95 % interval contains {SPARSE_BELOW:.0%}"
    return {"prediction": "sparse graph: < 1 % of tested pairs are edges", "verdict": verdict, "reason": reason,
            "statistic": {"edges": n_edges, "tested": n_tested, "fraction": frac, "ci95": [ci.low, ci.high]},
            "null": "a dense mesh: edge fraction >= 1 %"}


def heavy_tails(fits: list[dict], hub_test: dict | None, degree_rate: dict | None) -> dict:
    """Prediction 2 from `degree_fits` rows (as dicts), the hub-ablation result and the degree/rate
    correlation."""
    row = next((r for r in fits if r["direction"] == "out" and r["sign"] == "all" and not r.get("weighted")), None)
    stat = {"out_degree_fit": row, "hub_ablation": None if hub_test is None else
            {k: hub_test[k] for k in ("hub_median", "matched_median", "ratio", "hubs_above_matched", "p")},
            "degree_vs_firing_rate": degree_rate}
    out = {"prediction": "heavy-tailed degrees with hubs that matter", "statistic": stat,
           "null": "an exponential degree tail; hub ablation no larger than matched-rate random features"}
    if row is None or row["vs_exponential"] == "no fit":
        return {**out, "verdict": "inconclusive", "reason": "too few features with an out-edge to fit"}
    heavy = row["vs_exponential"] == "power law" or row["vs_lognormal"] == "lognormal"
    light = row["vs_exponential"] == "exponential"
    if light:
        return {**out, "verdict": "not supported", "reason": "an exponential tail fits the out-degrees better"}
    if not heavy:
        return {**out, "verdict": "inconclusive", "reason": "the tail comparison is undecided"}
    if hub_test is None or hub_test.get("p") is None:
        return {**out, "verdict": "inconclusive",
                "reason": "heavy tail found; the hub-ablation test was not run (it needs the model and SAEs)"}
    if hub_test["p"] < LEVEL:
        return {**out, "verdict": "supported", "reason": f"heavy tail, and hubs move the loss more than matched "
                                                        f"features (p = {hub_test['p']:.2g})"}
    return {**out, "verdict": "not supported",
            "reason": f"heavy tail, but hubs do not move the loss more than matched features (p = {hub_test['p']:.2g})"}


def excitation_by_layer(graph) -> dict:
    """Prediction 3 from the first-order edges' kinds and layer distances."""
    e = first_order(graph)
    exc = e["kind"] == "excitatory"
    cross, within = e["distance"] > 0, e["distance"] == 0
    kx, nx_, kw, nw = int((exc & cross).sum()), int(cross.sum()), int((exc & within).sum()), int(within.sum())
    stat = {"cross_layer": {"edges": nx_, "excitatory": kx, "share": kx / nx_ if nx_ else None},
            "within_layer": {"edges": nw, "excitatory": kw, "share": kw / nw if nw else None}}
    out = {"prediction": "excitation dominates across layers, inhibition within a layer", "statistic": stat,
           "null": "excitatory share 1/2 across layers; equal shares across and within"}
    within_tested = any(parse_site(a).layer == parse_site(b).layer for a, b in tested_by_site_pair(graph) or {})
    if nx_ == 0:
        return {**out, "verdict": "inconclusive", "reason": "no cross-layer edges"}
    p_cross = float(stats.binomtest(kx, nx_, 0.5, alternative="greater").pvalue)
    stat["cross_layer"]["p_above_half"] = p_cross
    if nw == 0:
        why = ("within-layer pairs were tested but none is an edge" if within_tested else
               "the graph has no within-layer pairs: build with two SAE sites in one layer "
               "(e.g. hook_resid_mid and hook_resid_post)")
        return {**out, "verdict": "inconclusive", "reason": why}
    table = [[kx, nx_ - kx], [kw, nw - kw]]
    p_less = float(stats.fisher_exact(table, alternative="greater").pvalue)
    stat["within_layer"]["p_share_below_cross"] = p_less
    if p_cross < LEVEL and p_less < LEVEL:
        verdict, reason = "supported", "cross-layer edges are mostly excitatory and within-layer edges less so"
    elif p_cross >= LEVEL and kx / nx_ <= 0.5:
        verdict, reason = "not supported", "cross-layer edges are not mostly excitatory"
    elif p_less >= LEVEL and kw / nw >= kx / nx_:
        verdict, reason = "not supported", "within-layer edges are at least as excitatory as cross-layer ones"
    else:
        verdict, reason = "inconclusive", "one of the two tests is not significant at 0.05"
    return {**out, "verdict": verdict, "reason": reason}


def degree_vs_rate(graph) -> dict | None:
    """Spearman correlation of each feature's total degree with its firing rate (features with both)."""
    nodes = graph.nodes.to_pydict()
    deg = {key: sum(c.values()) for key, c in degree_table(graph).items()}
    pairs = [(deg.get((s, int(f)), 0), r) for s, f, r in zip(nodes["site"], nodes["feature"], nodes["firing_rate"])
             if r is not None]
    if len(pairs) < 3:
        return None
    d, r = np.asarray(pairs, np.float64).T
    res = stats.spearmanr(d, r)
    return {"spearman": float(res.statistic), "p": float(res.pvalue), "features": len(pairs)}
