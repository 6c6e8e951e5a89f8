"""p-values for a mean effect when per-input effects are skewed.

The sign-flip test (`tails`) is exact when each input's effect is symmetric about zero under the
null, for instance when the source has no effect on any input. A weaker null is common in real
models: the effect is zero *on average* but not per input, and the per-input effects are skewed
(a few inputs with a large effect of one sign, many with a small one of the other). Then neither
the sign-flip test nor Student's t holds its level in the far tail that Bonferroni needs: the tail
of the studentised mean on the side opposite to the skew is much heavier than the symmetric
reference. Simulated with centred exponential effects (skewness 2) at n = 32 inputs, both reject
about 10 times as often as they should at p < 4e-4.

`skew_corrected_t_pvalues` applies Hall's (1992) monotone transformation of the studentised mean,
which removes the skewness term of its distribution to order 1/n:

    θ = mean / s,  γ = m₃ / m₂^{3/2} (sample skewness),
    T_H = √n (θ + γθ²/3 + γ²θ³/27 + γ/(6n)),  p = 2 min(F(T_H), 1 − F(T_H)),  F = Student t(n − 1).

T_H is non-decreasing in θ (its derivative is (1 + γθ/3)²), so the test is well defined on both
sides. The expansion behind it holds for θ of order 1/√n; on the side opposite to the skew it
flattens at γθ/3 = −1, where a large, consistent effect (say −1 on 80% of inputs and 0 on the
rest, γ = 1.5) would get p ≈ 1e-3 from 32 inputs. Past γθ/3 = −`FLAT_SIDE_CLIP` the transformation
therefore continues with slope 1 (the plain t statistic, shifted so T_H stays continuous): the
same p-value for such an effect is ≈ 1e-9, and the level under a skewed null barely moves (measured
in docs/results.md). It has no floor: all-equal effects (s = 0, mean ≠ 0) give p = 0.

`robust_pvalues` takes the larger of the sign-flip saddle-point p-value and this one: the first
is exact for symmetric per-input effects (where the skewness estimate only adds noise), the second
holds its level much better for skewed ones. Neither can be exact for every distribution of a
mean (no test of a mean is, at a fixed n); the calibration measured for each case is in
docs/results.md, and more inputs per source make every case better.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import t as student_t

from .permutation import pair_weights
from .tails import sign_flip_saddlepoint_pvalues

FLAT_SIDE_CLIP = 0.6           # Hall's transformation is used while γθ/3 ≥ −this; slope 1 past it


def _weighted_moments(per_input, weight):
    """n, mean, unbiased variance, skewness [S, T] over the inputs with weight > 0. per_input [S, M, T];
    weight [S, M] or [S, M, T]."""
    e = np.nan_to_num(np.asarray(per_input, np.float64))
    w = (pair_weights(weight, e.shape) > 0).astype(np.float64)
    n = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w * e).sum(1) / n
        c = (e - mean[:, None, :]) * w
        m2 = (c * c).sum(1) / n
        m3 = (c * c * c).sum(1) / n
        var = m2 * n / (n - 1)
        skew = np.where(m2 > 0, m3 / np.power(m2, 1.5), 0.0)
    return n, mean, var, skew


def _hall(theta, skew):
    """Hall's cubic θ + γθ²/3 + γ²θ³/27 (non-decreasing in θ)."""
    return theta + skew * theta ** 2 / 3.0 + skew ** 2 * theta ** 3 / 27.0


def skew_corrected_t_pvalues(per_input, weight) -> np.ndarray:
    """Two-sided p-values [S, T] of mean effect = 0 by Hall's skewness-corrected studentised mean
    (module docstring) against Student's t with n − 1 degrees of freedom. per_input [S, M, T],
    weight [S, M] or [S, M, T] (inputs with weight > 0 count). NaN where fewer than 2 inputs."""
    n, mean, var, skew = _weighted_moments(per_input, weight)
    out = np.full(mean.shape, np.nan)
    ok = n >= 2
    if not ok.any():
        return out
    n, mean, var, skew = n[ok], mean[ok], var[ok], skew[ok]
    s = np.sqrt(var)
    tiny = s <= 1e-12 * np.maximum(np.abs(mean), 1e-300)        # every input has the same effect
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        th = np.where(tiny, 0.0, mean / np.where(tiny, 1.0, s))
        flat = skew * th / 3.0 < -FLAT_SIDE_CLIP
        th_c = np.where(flat, -3.0 * FLAT_SIDE_CLIP / np.where(flat, skew, 1.0), th)
        g = _hall(th_c, skew) + np.where(flat, th - th_c, 0.0)
        h = np.sqrt(n) * (g + skew / (6.0 * n))
        df = n - 1
        p = 2.0 * np.minimum(student_t.sf(h, df), student_t.cdf(h, df))
    p = np.where(tiny, np.where(np.abs(mean) > 0, 0.0, 1.0), p)
    out[ok] = np.clip(p, 0.0, 1.0)
    return out


def robust_pvalues(per_input, weight) -> np.ndarray:
    """Two-sided p-values [S, T]: the larger of the sign-flip saddle-point p-value (exact under
    symmetric per-input effects) and the skewness-corrected t p-value (for skewed ones); the
    sign-flip value alone where there are fewer than 2 inputs. NaN where there are none."""
    sf = sign_flip_saddlepoint_pvalues(per_input, weight)
    sk = skew_corrected_t_pvalues(per_input, weight)
    return np.where(np.isfinite(sk), np.fmax(sf, sk), sf)
