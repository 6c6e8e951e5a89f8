"""From p-values and effect sizes to edges: the null threshold τ, the significance decision, the kind.

This is the one significance path: first-order edges and gating hyperedges both go through
`decide`, so a correction or a threshold means the same thing for every kind of edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import JfigError
from .corrections import CORRECTIONS, adjust, benjamini_hochberg, bonferroni


def site_thresholds(null_effects, sites, q: float = 0.99) -> dict[str, float]:
    """τ per target site: the q-quantile of |null effects| of that site's targets (0 without any).
    Sites differ in scale (residual norms grow with depth), so one pooled τ would be too strict for
    some sites and too lax for others."""
    null_effects, sites = np.asarray(null_effects, np.float64), np.asarray(sites)
    return {str(s): null_threshold(null_effects[sites == s], q) for s in np.unique(sites)}


def pair_thresholds(null_effects, source_sites, target_sites, q: float = 0.99) -> dict[tuple[str, str], float]:
    """τ per (source site, target site): the q-quantile of |null effects| of that site pair. Effects
    are per unit of source activation, and sources at different sites differ in scale (their SAEs'
    decoder norms, the residual's growth), so the null of one source site does not bound another's."""
    null_effects = np.asarray(null_effects, np.float64)
    src, tgt = np.asarray(source_sites).astype(str), np.asarray(target_sites).astype(str)
    pairs = sorted(set(zip(src.tolist(), tgt.tolist())))
    return {(a, b): null_threshold(null_effects[(src == a) & (tgt == b)], q) for a, b in pairs}


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



@dataclass(frozen=True)
class StreamedFamily:
    """The decision of `decide` for a family too large to hold at once (a dense build's pairs, block by
    block on disk), from two passes. Pass one gives the family size and every p-value <= alpha: the
    only ones a correction can keep, and all Benjamini–Hochberg needs for q-values <= alpha. Pass two
    decides each block with `decide_block`, exactly as `decide` over the whole family would.

    q-values are exact wherever q <= alpha (every kept edge); above alpha they are upper bounds, and
    NaN for p > alpha."""

    alpha: float
    correction: str
    n_tested: int
    small_p: np.ndarray      # sorted p-values <= alpha
    small_q: np.ndarray      # their BH q-values

    @classmethod
    def from_smallest(cls, small_p, n_tested: int, *, alpha: float, correction: str) -> "StreamedFamily":
        """small_p: every finite p-value <= alpha of the family (any order); n_tested: its finite p-values."""
        if correction not in CORRECTIONS and correction not in ("fdr", "benjamini-hochberg"):
            raise JfigError(f"unknown correction {correction!r}; expected one of {list(CORRECTIONS)}")
        p = np.sort(np.asarray(small_p, np.float64))
        if p.size > n_tested or (p.size and (not np.isfinite(p).all() or p[-1] > alpha)):
            raise JfigError(f"small_p must hold at most n_tested = {n_tested} finite p-values <= alpha = {alpha}")
        q = np.minimum.accumulate((p * max(n_tested, 1) / np.arange(1, p.size + 1))[::-1])[::-1]
        return cls(alpha, correction, int(n_tested), p, np.minimum(q, 1.0))

    def q_values(self, p) -> np.ndarray:
        """BH q-values of p-values of this family (NaN above alpha)."""
        p = np.asarray(p, np.float64)
        idx = np.searchsorted(self.small_p, p, side="right") - 1
        ok = np.isfinite(p) & (p <= self.alpha) & (idx >= 0)
        return np.where(ok, self.small_q[np.clip(idx, 0, None)] if self.small_q.size else np.nan, np.nan)

    def decide_block(self, mean, p, tau=0.0) -> Decision:
        """The decision of some of the family's tests (mean, p [n]; tau a number or [n]), with the
        whole family's size behind every correction."""
        p = np.asarray(p, np.float64)
        q = self.q_values(p)
        p_bonf = bonferroni(p, self.n_tested)
        adj = {"bonferroni": p_bonf, "none": p}.get(self.correction, q)
        m = np.asarray(mean, np.float64)
        keep = np.isfinite(adj) & (adj < self.alpha) & np.isfinite(m) & (np.abs(m) > tau)
        return Decision(keep=keep, p_bonferroni=p_bonf, q_value=q,
                        tau=np.broadcast_to(np.asarray(tau, np.float64), p.shape), n_tested=self.n_tested)


def edge_kind(mean) -> np.ndarray:
    """'excitatory' for positive effects, 'inhibitory' for negative."""
    return np.where(np.asarray(mean) > 0, "excitatory", "inhibitory")
