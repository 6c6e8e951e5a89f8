"""How interactions change with layer distance, and the excitatory and inhibitory subgraphs compared.

    decay = layer_decay(graph)      # per layer distance: tested pairs, edges, density, mean |weight|; fits
    signs = sign_comparison(graph)  # locality, fan-out, fan-in and strength of each sign, with tests

Layer distance is target layer - source layer (0: within a layer, e.g. hook_resid_mid ->
hook_resid_post of one block). Density is edges / tested pairs at that distance, the tested pairs
coming from the manifest's `n_tested_by_site_pair` (graphs built before it was recorded have no
density). Both mean |weight| and density are fitted over distances >= 1 by least squares on the
log: exponential y = A exp(-d / lambda) (local computation) and power law y = A d^-beta (long-range,
skip-connection-like); the fit with the smaller residual on the log scale is preferred when both
fit at least three distances, and the comparison is called undecided when the two residuals are
within 10 % of each other.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from scipy import stats

from ..sites import parse_site

FIRST = ("excitatory", "inhibitory")
MIN_FIT_POINTS = 3
CLOSE = 0.10


def first_order(graph) -> dict[str, np.ndarray]:
    """Columns of the first-order edges: source_site, target_site, kind, |weight|, layer distance."""
    e = graph.edges
    kind = np.asarray(e.column("kind").to_pylist())
    keep = np.isin(kind, FIRST)
    out = {k: np.asarray(e.column(k).to_pylist())[keep] for k in ("source_site", "target_site", "source", "target")}
    out["kind"] = kind[keep]
    out["abs_weight"] = np.abs(np.asarray(e.column("weight").to_pylist(), np.float64)[keep])
    out["distance"] = (np.asarray(e.column("target_layer").to_pylist(), np.int64)
                       - np.asarray(e.column("source_layer").to_pylist(), np.int64))[keep]
    return out


def tested_by_site_pair(graph) -> dict[tuple[str, str], int] | None:
    """(source site, target site) -> pairs tested, from the manifest's `n_tested_by_site_pair` (None if
    the graph did not record it)."""
    by_pair = (graph.manifest.get("statistics") or {}).get("n_tested_by_site_pair")
    if not by_pair:
        return None
    return {tuple(s.strip() for s in pair.split("->")): int(n) for pair, n in by_pair.items()}


def tested_by_distance(graph) -> dict[int, int] | None:
    """Layer distance -> pairs tested there, from the manifest (None if the graph did not record it)."""
    by_pair = tested_by_site_pair(graph)
    if by_pair is None:
        return None
    out: dict[int, int] = {}
    for (a, b), n in by_pair.items():
        d = parse_site(b).layer - parse_site(a).layer
        out[d] = out.get(d, 0) + n
    return out


def fit_decay(d: np.ndarray, y: np.ndarray) -> dict:
    """Exponential and power-law fits of y(d) over d >= 1 and y > 0 (least squares on log y)."""
    ok = (d >= 1) & (y > 0) & np.isfinite(y)
    d, y = d[ok].astype(np.float64), y[ok]
    out = {"points": int(ok.sum()), "exponential": None, "power_law": None, "preferred": "not enough distances",
           "note": f"fits need at least {MIN_FIT_POINTS} layer distances >= 1 with a positive value"}
    if len(d) < MIN_FIT_POINTS:
        return out
    ly = np.log(y)
    ex = stats.linregress(d, ly)
    pw = stats.linregress(np.log(d), ly)
    rss_ex = float(((ly - (ex.intercept + ex.slope * d)) ** 2).sum())
    rss_pw = float(((ly - (pw.intercept + pw.slope * np.log(d))) ** 2).sum())
    out["exponential"] = {"A": float(np.exp(ex.intercept)), "length": float(-1 / ex.slope) if ex.slope else None,
                          "rss_log": rss_ex, "r2": float(ex.rvalue ** 2)}
    out["power_law"] = {"A": float(np.exp(pw.intercept)), "beta": float(-pw.slope), "rss_log": rss_pw,
                        "r2": float(pw.rvalue ** 2)}
    lo, hi = sorted((rss_ex, rss_pw))
    if hi - lo <= CLOSE * max(hi, 1e-12):
        out["preferred"], out["note"] = "undecided", "the two fits' log residuals are within 10 % of each other"
    else:
        out["preferred"] = "exponential" if rss_ex < rss_pw else "power law"
        out["note"] = ""
    return out


def layer_decay(graph) -> dict:
    """Rows per layer distance (tested, edges, excitatory, inhibitory, density, mean and median |weight|)
    and exponential / power-law fits of mean |weight| and of density against distance."""
    e = first_order(graph)
    tested = tested_by_distance(graph)
    rows = []
    for d in sorted(set(e["distance"].tolist()) | set(tested or ())):
        m = e["distance"] == d
        n_t = tested.get(d) if tested else None
        rows.append({"distance": int(d), "tested": n_t, "edges": int(m.sum()),
                     "excitatory": int((m & (e["kind"] == "excitatory")).sum()),
                     "inhibitory": int((m & (e["kind"] == "inhibitory")).sum()),
                     "density": int(m.sum()) / n_t if n_t else None,
                     "mean_abs_weight": float(e["abs_weight"][m].mean()) if m.any() else None,
                     "median_abs_weight": float(np.median(e["abs_weight"][m])) if m.any() else None})
    d = np.asarray([r["distance"] for r in rows], np.float64)
    w = np.asarray([np.nan if r["mean_abs_weight"] is None else r["mean_abs_weight"] for r in rows])
    dens = np.asarray([np.nan if r["density"] is None else r["density"] for r in rows])
    return {"rows": rows, "weight_fit": fit_decay(d, w),
            "density_fit": fit_decay(d, dens) if tested else {"preferred": "no density",
                                                              "note": "the graph does not record pairs tested per "
                                                                      "site pair (built before it was recorded)"}}


def sign_comparison(graph) -> dict:
    """Per sign: edges, share within a layer, mean layer distance, mean |weight|, mean fan-out (edges per
    source with such an edge) and fan-in; Mann-Whitney tests (two-sided) of layer distance, |weight|,
    fan-out and fan-in between the signs."""
    e = first_order(graph)
    out: dict = {"signs": {}, "tests": {}}
    samples: dict = {}
    for kind in FIRST:
        m = e["kind"] == kind
        src = list(zip(e["source_site"][m].tolist(), e["source"][m].tolist()))
        tgt = list(zip(e["target_site"][m].tolist(), e["target"][m].tolist()))
        fan_out = np.asarray(list(Counter(src).values()), np.float64)
        fan_in = np.asarray(list(Counter(tgt).values()), np.float64)
        samples[kind] = {"layer distance": e["distance"][m], "abs weight": e["abs_weight"][m], "fan-out": fan_out,
                         "fan-in": fan_in}
        out["signs"][kind] = {"edges": int(m.sum()),
                              "within_layer_share": float((e["distance"][m] == 0).mean()) if m.any() else None,
                              "mean_layer_distance": float(e["distance"][m].mean()) if m.any() else None,
                              "mean_abs_weight": float(e["abs_weight"][m].mean()) if m.any() else None,
                              "mean_fan_out": float(fan_out.mean()) if len(fan_out) else None,
                              "mean_fan_in": float(fan_in.mean()) if len(fan_in) else None}
    for name in ("layer distance", "abs weight", "fan-out", "fan-in"):
        a, b = samples["excitatory"][name], samples["inhibitory"][name]
        if len(a) and len(b) and np.unique(np.concatenate([a, b])).size > 1:
            res = stats.mannwhitneyu(a, b, alternative="two-sided")
            out["tests"][name] = {"excitatory_median": float(np.median(a)), "inhibitory_median": float(np.median(b)),
                                  "u": float(res.statistic), "p": float(res.pvalue)}
        else:
            out["tests"][name] = {"excitatory_median": None, "inhibitory_median": None, "u": None, "p": None}
    return out
