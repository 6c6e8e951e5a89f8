"""From p-values and effect sizes to edges: the null threshold τ, the significance decision, the kind.

This is the one significance path: first-order edges and gating hyperedges both go through
`decide`, so a correction or a threshold means the same thing for every kind of edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .corrections import adjust, benjamini_hochberg, bonferroni


def site_thresholds(null_effects, sites, q: float = 0.99) -> dict[str, float]:
    """τ per target site: the q-quantile of |null effects| of that site's targets (0 without any).
    Sites differ in scale (residual norms grow with depth), so one pooled τ would be too strict for
    some sites and too lax for others."""
    null_effects, sites = np.asarray(null_effects, np.float64), np.asarray(sites)
    return {str(s): null_threshold(null_effects[sites == s], q) for s in np.unique(sites)}


def null_threshold(null_effects, q: float = 0.99) -> float:
    """τ: the q-quantile of |null effects| (finite entries); 0 without any."""
    a = np.abs(np.asarray(null_effects, np.float64))
    a = a[np.isfinite(a)]
    return float(np.quantile(a, q)) if a.size else 0.0


def significant(mean, p, *, tau=0.0, alpha: float = 0.01, correction: str = "bonferroni"):
    """Boolean mask of edges: corrected p < alpha and |mean| > tau (a number, or one per test); also
    returns the corrected values."""
    adj = adjust(p, correction)
    m = np.asarray(mean, np.float64)
    keep = np.isfinite(adj) & (adj < alpha) & np.isfinite(m) & (np.abs(m) > tau)
    return keep, adj


@dataclass(frozen=True)
class Decision:
    """The outcome of testing a family of pairs (all arrays [n_tests])."""

    keep: np.ndarray          # bool: an edge
    p_bonferroni: np.ndarray
    q_value: np.ndarray       # Benjamini–Hochberg
    tau: np.ndarray           # the size threshold each test had to exceed
    n_tested: int             # finite p-values in the family


def decide(mean, p, *, alpha: float, correction: str, tau=0.0) -> Decision:
    """Test a family: corrected p < alpha and |mean| > tau (a number, or one per test, e.g. per target
    site). Bonferroni and BH values are both kept."""
    p = np.asarray(p, np.float64)
    keep, _ = significant(mean, p, tau=tau, alpha=alpha, correction=correction)
    return Decision(keep=keep, p_bonferroni=bonferroni(p), q_value=benjamini_hochberg(p),
                    tau=np.broadcast_to(np.asarray(tau, np.float64), p.shape),
                    n_tested=int(np.isfinite(p).sum()))


def edge_kind(mean) -> np.ndarray:
    """'excitatory' for positive effects, 'inhibitory' for negative."""
    return np.where(np.asarray(mean) > 0, "excitatory", "inhibitory")
