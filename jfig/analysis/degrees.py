"""Degree distributions of an interaction graph: is there a heavy tail, and of which kind?

    fits = degree_fits(signed_edges(graph))
    fits.to_pylist()     # one row per (direction, sign): alpha, xmin, and likelihood-ratio comparisons

Each distribution (out- or in-degree of the features with at least one such edge; excitatory,
inhibitory or both) is fitted by the `powerlaw` package (Alstott, Bullmore & Plenz; discrete fits,
xmin chosen by the Kolmogorov–Smirnov distance as Clauset, Shalizi & Newman propose) and the power
law is compared with a log-normal and an exponential tail above xmin by the normalised
log-likelihood ratio R (R > 0 favours the power law) and its p-value (small p: the sign of R is
significant). `preferred` names the better fit where p < 0.1 and "undecided" otherwise.
"""
from __future__ import annotations

import warnings

import numpy as np
import powerlaw
import pyarrow as pa

from ..errors import JfigError
from .rewire import SignedEdges

MIN_NODES = 10            # fewer nodes with an edge: no fit
DECIDED_P = 0.1
XMIN_GRID = 60            # candidate xmin values (quantiles) for continuous fits


def degree_sequence(edges: SignedEdges, direction: str, sign: int | None, weighted: bool = False) -> np.ndarray:
    """Degrees (> 0) of the nodes in one direction ("out" or "in"), counting edges of one sign (None:
    both); weighted: the summed |weight| of those edges (the node's strength) instead of their number."""
    keep = np.ones(len(edges), bool) if sign is None else edges.sign == sign
    ends = edges.source if direction == "out" else edges.target
    w = None
    if weighted:
        if edges.weight is None:
            raise JfigError("weighted degrees need edge weights (SignedEdges.weight)")
        w = edges.weight[keep]
    deg = np.bincount(ends[keep], weights=w, minlength=len(edges.layer))
    return deg[deg > 0]


def continuous_fit(x: np.ndarray) -> "powerlaw.Fit":
    """powerlaw's continuous fit with xmin chosen by the same Kolmogorov-Smirnov criterion over
    XMIN_GRID quantiles of x instead of every distinct value (every value of a continuous sample is
    distinct, which makes the library's search quadratic: 3 s for 10^4 strengths, against 0.06 s)."""
    grid = np.unique(np.quantile(x, np.linspace(0.0, 0.95, XMIN_GRID)))
    best = min(grid, key=lambda m: powerlaw.Fit(x, xmin=m, discrete=False, verbose=False).power_law.D)
    return powerlaw.Fit(x, xmin=best, discrete=False, verbose=False)


def fit_tail(deg: np.ndarray, weighted: bool):
    """(fit, (R, p) against the log-normal, (R, p) against the exponential), or None when powerlaw
    cannot compare the tail it chose (a tail of one distinct value: "No data points in defined range")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            try:
                fit = continuous_fit(deg) if weighted else powerlaw.Fit(deg, discrete=True, verbose=False)
                return fit, _compare(fit, "lognormal"), _compare(fit, "exponential")
            except ValueError:
                return None


def _compare(fit, other: str) -> tuple[float, float]:
    r, p = fit.distribution_compare("power_law", other, normalized_ratio=True)
    return float(r), float(p)


def degree_fits(edges: SignedEdges) -> pa.Table:
    """A row per (direction, sign, weighted): n_nodes, max_degree, alpha, xmin, n_tail (nodes at or
    above xmin), R and p against the log-normal and the exponential, and the preferred tail of each
    comparison. Weighted rows (when the edges have weights) fit the strengths, sums of |weight|, as
    continuous values (xmin from a grid of quantiles, `continuous_fit`). Distributions over fewer than
    MIN_NODES nodes get NaN fits."""
    rows = []
    kinds = (False, True) if edges.weight is not None else (False,)
    for weighted, direction in ((w, d) for w in kinds for d in ("out", "in")):
        for name, sign in (("all", None), ("excitatory", 1), ("inhibitory", -1)):
            deg = degree_sequence(edges, direction, sign, weighted)
            row = dict(direction=direction, sign=name, weighted=weighted, n_nodes=len(deg),
                       max_degree=float(deg.max(initial=0)),
                       alpha=np.nan, xmin=np.nan, n_tail=0, r_lognormal=np.nan, p_lognormal=np.nan,
                       r_exponential=np.nan, p_exponential=np.nan, vs_lognormal="no fit", vs_exponential="no fit")
            fitted = fit_tail(deg, weighted) if len(deg) >= MIN_NODES and len(np.unique(deg)) > 1 else None
            if fitted is not None:
                fit, (r_ln, p_ln), (r_ex, p_ex) = fitted
                row.update(alpha=float(fit.power_law.alpha), xmin=float(fit.power_law.xmin),
                           n_tail=int((deg >= fit.power_law.xmin).sum()), r_lognormal=r_ln, p_lognormal=p_ln,
                           r_exponential=r_ex, p_exponential=p_ex,
                           vs_lognormal=_verdict(r_ln, p_ln, "lognormal"), vs_exponential=_verdict(r_ex, p_ex,
                                                                                                  "exponential"))
            rows.append(row)
    return pa.Table.from_pylist(rows)


def _verdict(r: float, p: float, other: str) -> str:
    if not (np.isfinite(r) and np.isfinite(p)) or p >= DECIDED_P:
        return "undecided"
    return "power law" if r > 0 else other
