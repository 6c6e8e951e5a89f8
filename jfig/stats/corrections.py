"""Multiple-testing corrections: Bonferroni (family-wise) and Benjamini–Hochberg (false discovery rate)."""
from __future__ import annotations

import numpy as np
from scipy.stats import false_discovery_control

from ..errors import JfigError

CORRECTIONS = ("bonferroni", "bh", "none")


def bonferroni(p, m: int | None = None) -> np.ndarray:
    """Bonferroni-adjusted p-values, capped at 1; m defaults to the number of finite p-values."""
    p = np.asarray(p, np.float64)
    m = int(np.isfinite(p).sum()) if m is None else m
    return np.minimum(p * max(m, 1), 1.0)


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini–Hochberg q-values (same shape; NaN stays NaN), by `scipy.stats.false_discovery_control`."""
    p = np.asarray(p, np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(np.clip(p[ok], 0.0, 1.0), method="bh")
    return q


def adjust(p, correction: str) -> np.ndarray:
    """p-values adjusted by `correction` ("bonferroni", "bh" or "none")."""
    if correction == "bonferroni":
        return bonferroni(p)
    if correction in ("bh", "fdr", "benjamini-hochberg"):
        return benjamini_hochberg(p)
    if correction == "none":
        return np.asarray(p, np.float64)
    raise JfigError(f"unknown correction {correction!r}; expected one of {list(CORRECTIONS)}")
