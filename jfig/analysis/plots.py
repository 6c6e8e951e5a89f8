"""Figures of an analysis, drawn with matplotlib's object API (no pyplot state, any backend) and
readable at 10^5 edges: distributions and aggregates, never one mark per edge.

Each function takes what it draws and a path, writes a PNG and returns the path.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import powerlaw
from matplotlib.figure import Figure

from ..sites import sort_sites
from .degrees import degree_sequence
from .layers import tested_by_site_pair
from .rewire import SignedEdges

DPI = 120


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def degree_ccdf(edges: SignedEdges, path) -> Path:
    """Out- and in-degree CCDFs (all edges, excitatory, inhibitory) with the power-law, log-normal and
    exponential fits of the all-edges distribution above its xmin."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, direction in zip(fig.subplots(1, 2), ("out", "in")):
        for name, sign, style in (("all", None, "k-"), ("excitatory", 1, "C0-"), ("inhibitory", -1, "C3-")):
            deg = np.sort(degree_sequence(edges, direction, sign))
            if len(deg) == 0:
                continue
            ccdf = 1 - np.arange(len(deg)) / len(deg)
            ax.step(deg, ccdf, style, where="post", label=f"{name} ({len(deg):,} features)", lw=1.2)
        deg = degree_sequence(edges, direction, None)
        if len(deg) >= 10 and len(np.unique(deg)) > 1:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                fit = powerlaw.Fit(deg, discrete=True, verbose=False)
                tail = (deg >= fit.power_law.xmin).mean()
                x = np.unique(deg[deg >= fit.power_law.xmin]).astype(np.float64)
                for dist, style, label in ((fit.power_law, "--", f"power law α={fit.power_law.alpha:.2f}"),
                                           (fit.lognormal, ":", "log-normal"), (fit.exponential, "-.", "exponential")):
                    ax.plot(x, tail * dist.ccdf(x), style, color="0.4", lw=1, label=label)
        ax.set(xscale="log", yscale="log", xlabel=f"{direction}-degree", ylabel="P(degree ≥ x)",
               title=f"{direction}-degree distribution")
        ax.legend(fontsize=7)
    return _save(fig, path)


def layer_decay(decay: dict, path) -> Path:
    """Mean |weight| and edge density against layer distance, with the exponential and power-law fits."""
    rows = decay["rows"]
    d = np.asarray([r["distance"] for r in rows], np.float64)
    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, key, fit_key, label in zip(fig.subplots(1, 2), ("mean_abs_weight", "density"),
                                       ("weight_fit", "density_fit"), ("mean |weight|", "edges / tested pairs")):
        y = np.asarray([np.nan if r[key] is None else r[key] for r in rows], np.float64)
        ax.plot(d, y, "o-", color="k", label="measured")
        fit = decay[fit_key]
        xs = np.linspace(max(1, d.min()), max(d.max(), 1), 50)
        if fit.get("exponential"):
            e = fit["exponential"]
            if e["length"]:
                ax.plot(xs, e["A"] * np.exp(-xs / e["length"]), "--", color="C0", label=f"exponential λ={e['length']:.2g}")
            p = fit["power_law"]
            ax.plot(xs, p["A"] * xs ** -p["beta"], ":", color="C3", label=f"power law β={p['beta']:.2g}")
        ax.set(yscale="log", xlabel="layer distance (target - source)", ylabel=label,
               title=f"{label}\npreferred fit: {fit.get('preferred', '')}")
        ax.set_xticks(sorted(set(d.astype(int).tolist())))
        ax.legend(fontsize=7)
    return _save(fig, path)


def motif_z(rows: list[dict], path) -> Path:
    """z-scores of the motifs that have a null spread, with the ±2 band."""
    rows = [r for r in rows if r["z"] is not None and np.isfinite(r["z"])]
    fig = Figure(figsize=(7, 0.4 * max(len(rows), 1) + 1.2))
    ax = fig.subplots()
    if rows:
        z = [r["z"] for r in rows]
        ax.barh([r["motif"] for r in rows], z, color=["C0" if v >= 2 else "C3" if v <= -2 else "0.6" for v in z])
    ax.axvline(2, color="k", ls=":", lw=0.8)
    ax.axvline(-2, color="k", ls=":", lw=0.8)
    ax.set(xlabel="z against the degree- and sign-preserving rewired null", title="motif z-scores")
    return _save(fig, path)


def community_sizes(methods: dict, path) -> Path:
    """Rank-size plot of each method's communities."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, row in methods.items():
        sizes = row["sizes"]
        if sizes:
            ax.plot(np.arange(1, len(sizes) + 1), sizes, "o-", ms=3,
                    label=f"{name}: {len(sizes)} communities, Q={row['value']:.3f} (null {row['null_mean'] or 0:.3f})")
    ax.set(xscale="log", yscale="log", xlabel="rank", ylabel="features", title="community sizes")
    ax.legend(fontsize=7)
    return _save(fig, path)


def adjacency(graph, path) -> Path:
    """Site-by-site heat maps: excitatory and inhibitory edges per tested pair (count where the graph
    does not record pairs tested), source site by row, target site by column."""
    e = graph.edges.to_pydict()
    sites = list(sort_sites({*e["source_site"], *e["target_site"], *graph.nodes.column("site").to_pylist()}))
    at = {s: i for i, s in enumerate(sites)}
    tested = np.zeros((len(sites), len(sites)))
    for (a, b), n in (tested_by_site_pair(graph) or {}).items():
        if a in at and b in at:
            tested[at[a], at[b]] = n
    fig = Figure(figsize=(12, 5), layout="constrained")
    for ax, kind, cmap in zip(fig.subplots(1, 2), ("excitatory", "inhibitory"), ("Blues", "Reds")):
        m = np.zeros_like(tested)
        for a, b, k in zip(e["source_site"], e["target_site"], e["kind"]):
            if k == kind:
                m[at[a], at[b]] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            val = np.where(tested > 0, m / tested, np.nan) if tested.any() else np.where(m > 0, m, np.nan)
        im = ax.imshow(val, cmap=cmap)
        fig.colorbar(im, ax=ax, shrink=0.8, label="edges / tested pairs" if tested.any() else "edges")
        short = [s.replace("blocks.", "").replace("hook_", "") for s in sites]
        ax.set_xticks(range(len(sites)), short, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(sites)), short, fontsize=7)
        ax.set(title=f"{kind} edges", xlabel="target site", ylabel="source site")
    return _save(fig, path)


def estimator_agreement(comparison, path) -> Path:
    """Hexbin of the first two methods' effects over every pair both measured, with the diagonal."""
    a_name, b_name = comparison.methods[:2]
    a = np.asarray(comparison.effects[a_name].mean, np.float64).ravel()
    b = np.asarray(comparison.effects[b_name].mean, np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    if ok.any():
        ax.hexbin(a[ok], b[ok], gridsize=60, bins="log", cmap="viridis", mincnt=1)
        lim = np.abs(np.concatenate([a[ok], b[ok]])).max()
        ax.plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
    ax.set(xlabel=f"{a_name} effect", ylabel=f"{b_name} effect", title=f"estimator agreement ({ok.sum():,} pairs)")
    return _save(fig, path)
