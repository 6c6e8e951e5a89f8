"""Tail probabilities of the sign-flip distribution without the floor of the normal approximation.

Each per-input effect e_m is a paired difference; under the null its sign is a fair coin, so the
observed sum s = |Σ a_m| (a_m = w_m e_m, w_m ∈ {0, 1}) is compared with S = Σ ε_m a_m for
independent Rademacher ε_m. The two-sided p-value is P(|S| ≥ s) = 2 P(S ≥ s) for s > 0 (S is
symmetric), and 1 for s = 0. With k nonzero a_m the smallest value it can take is 2 / 2^k, reached
when every nonzero effect has the same sign.

- `sign_flip_exact_pvalues`: the exact p-value by enumerating the 2^n sign patterns (meet in the
  middle: two halves of 2^(n/2) partial sums, counted by sorting), for n ≤ 20 inputs.
- `sign_flip_saddlepoint_pvalues`: the Lugannani–Rice saddle-point approximation of P(S ≥ s),
  which keeps a small relative error far into the tail (p ≪ 1e-8) where z = s / √Σa² ≤ √n
  caps the normal approximation at erfc(√(n/2)) (about 1.5e-8 for n = 32).
"""
from __future__ import annotations

import numpy as np
from scipy.special import erfc, log_ndtr

from ..errors import JfigError
from .permutation import pair_weights

EXACT_MAX_INPUTS = 20          # enumeration limit of `sign_flip_exact_pvalues`
AUTO_EXACT_INPUTS = 16         # `sign_flip_saddlepoint_pvalues` counts exactly when ≤ this many inputs can flip
_NEWTON_STEPS = 200
_SMALL_Z = 0.1                 # below this z the tail is ~1/2 and the normal form is used (no 0/0)
_REL_TOL = 1e-9                # ties with the observed sum, relative to Σ|a|


def min_attainable_pvalue(n) -> np.ndarray | float:
    """The smallest two-sided sign-flip p-value n inputs can give: 2 / 2^n (1 for n ≤ 1)."""
    n = np.asarray(n, np.float64)
    out = np.minimum(1.0, np.exp2(1.0 - np.maximum(n, 0.0)))
    return float(out) if out.ndim == 0 else out


def min_inputs_for_pvalue(p: float) -> int:
    """The fewest inputs whose smallest attainable sign-flip p-value is below p (p in (0, 1])."""
    return int(np.floor(1.0 - np.log2(p))) + 1


def _effects(per_input, weight):
    """a = w e as [S, T, M] float64 (NaN → 0) and the number of weighted inputs per entry [S, T];
    weight is [S, M] (shared by every target) or [S, M, T] (per pair)."""
    e = np.nan_to_num(np.asarray(per_input, np.float64))
    w = pair_weights(weight, e.shape)
    return np.moveaxis(w * e, 1, 2), (w > 0).sum(1)


def _log_cosh(x):
    ax = np.abs(x)
    return ax + np.log1p(np.exp(-2.0 * ax)) - np.log(2.0)


def _sign_patterns(k: int) -> np.ndarray:
    """All 2^k sign vectors, [2^k, k]."""
    return 1.0 - 2.0 * ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1)


def _exact_tail_counts(a, thr):
    """#{sign patterns: Σ ε a ≥ thr} for a [E, N] and thresholds thr [E] (counted by sorting)."""
    E, N = a.shape
    h = N // 2
    lo = a[:, :h] @ _sign_patterns(h).T                         # [E, 2^h]
    hi = a[:, h:] @ _sign_patterns(N - h).T                     # [E, 2^(N-h)]
    q = thr[:, None] - lo                                       # count hi ≥ q for every lo
    both = np.concatenate([q, hi], axis=1)
    order = np.argsort(both, axis=1, kind="stable")             # ties: queries before equal partial sums
    is_hi = order >= q.shape[1]
    hi_below = np.cumsum(is_hi, axis=1)                         # # partial sums strictly below each query
    return ((hi.shape[1] - hi_below) * ~is_hi).sum(1)


def sign_flip_exact_pvalues(per_input, weight, *, chunk: int = 4096) -> np.ndarray:
    """Exact two-sided sign-flip p-values [S, T] by enumeration; per_input [S, M, T], weight [S, M] or [S, M, T]
    with at most `EXACT_MAX_INPUTS` weighted inputs per row. Rows without inputs get NaN."""
    a, n = _effects(per_input, weight)
    S, T, M = a.shape
    if n.max(initial=0) > EXACT_MAX_INPUTS:
        raise JfigError(f"exact enumeration takes at most {EXACT_MAX_INPUTS} inputs per entry, got {n.max()}")
    out = np.full((S, T), np.nan)
    used = np.moveaxis(pair_weights(weight, (S, M, T)), 1, 2) > 0     # [S, T, M]
    for r in range(S):
        if n[r].max(initial=0) == 0:
            continue
        if not (used[r] == used[r, :1]).all():         # inputs chosen per pair: one target at a time
            for t in np.flatnonzero(n[r] > 0):
                out[r, t] = sign_flip_exact_pvalues(per_input[r:r + 1, :, t:t + 1],
                                                    used[r:r + 1, t, :, None].astype(np.float64))[0, 0]
            continue
        ar = a[r][:, used[r, 0]]                                # [T, n_r]
        s = np.abs(ar.sum(1))
        scale = np.abs(ar).sum(1)
        thr = s - _REL_TOL * scale
        p = np.ones(T)
        for t0 in range(0, T, chunk):
            sl = slice(t0, t0 + chunk)
            cnt = _exact_tail_counts(ar[sl], thr[sl])
            p[sl] = np.where(s[sl] > _REL_TOL * scale[sl], np.minimum(1.0, 2.0 * cnt / 2.0 ** n[r].max()), 1.0)
        out[r] = p
    return out


def _saddle_tail(a, s):
    """Lugannani–Rice P(S ≥ s), continuity-corrected; a [E, M], 0 < s < Σ|a| [E]. See
    `sign_flip_saddlepoint_pvalues`."""
    absa = np.abs(a)
    nz = absa > 0
    amin = np.where(nz, absa, np.inf).min(1)
    sc = s - amin                                                # half a lattice step below s
    var = (a * a).sum(1)
    t = np.zeros_like(s)
    for _ in range(_NEWTON_STEPS):                              # K' concave on t ≥ 0: monotone from below
        th = np.tanh(t[:, None] * a)
        k1 = (a * th).sum(1)
        k2 = (a * a * (1.0 - th * th)).sum(1)
        step = np.where(sc > k1, (sc - k1) / np.maximum(k2, 1e-300), 0.0)
        t = t + step
        if np.all(step <= 1e-13 * np.maximum(t, 1e-300)):
            break
    th = np.tanh(t[:, None] * a)
    k0 = _log_cosh(t[:, None] * a).sum(1)
    k2 = (a * a * (1.0 - th * th)).sum(1)
    w = np.sqrt(np.maximum(2.0 * (t * sc - k0), 0.0))
    u = 2.0 * np.sinh(t * amin) / (2.0 * amin) * np.sqrt(k2)     # (2/Δ) sinh(tΔ/2) √K'', Δ = 2 a_min
    z = sc / np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Φ̄(w) + φ(w) (1/u − 1/w) = φ(w) [Φ̄(w)/φ(w) + 1/u − 1/w], in logs so it does not underflow
        log_phi = -0.5 * w * w - 0.5 * np.log(2 * np.pi)
        mills = np.exp(log_ndtr(-w) - log_phi)
        p = np.exp(log_phi) * (mills + 1.0 / u - 1.0 / w)
    small = (z < _SMALL_Z) | ~np.isfinite(p) | (sc <= 0)
    return np.where(small, 0.5 * erfc(np.maximum(z, 0.0) / np.sqrt(2.0)), p)


def _edge_exact(absa, s, k, max_small: int, chunk: int = 8192):
    """Exact two-sided p-values [E] where at most `max_small` nonzero |a_m| lie below the gap
    g = (Σ|a| − s)/2 (NaN elsewhere). absa [E, M]; s, k [E].

    S ≥ s exactly when the inputs given a minus sign, F, have Σ_F |a| ≤ g, so only inputs with
    |a_m| ≤ g can be in F and P(S ≥ s) = #{F ⊆ {m : |a_m| ≤ g} : Σ_F |a| ≤ g} / 2^k."""
    total = absa.sum(1)
    tol = _REL_TOL * total
    g = 0.5 * (total - s)
    nz = np.where(absa > 0, absa, np.inf)
    small = (nz <= (g + tol)[:, None]).sum(1)
    out = np.full(len(s), np.nan)
    idx = np.flatnonzero(small <= max_small)
    J = int(small[idx].max(initial=0))
    if not idx.size:
        return out
    b = np.sort(nz[idx], axis=1)[:, :J] if J else np.zeros((idx.size, 0))
    big = (2.0 * g[idx] + total[idx] + 1.0)[:, None]
    b = np.where(b <= (g[idx] + tol[idx])[:, None], b, big)      # an input above the gap never flips
    thr = b.sum(1) - 2.0 * g[idx] - tol[idx]
    cnt = np.concatenate([_exact_tail_counts(b[c: c + chunk], thr[c: c + chunk])
                          for c in range(0, idx.size, chunk)]) if J else np.ones(idx.size)
    out[idx] = np.minimum(1.0, 2.0 * cnt * np.exp2(-k[idx].astype(np.float64)))
    return out


def sign_flip_saddlepoint_pvalues(per_input, weight, *, exact_max_inputs: int = AUTO_EXACT_INPUTS) -> np.ndarray:
    """Two-sided sign-flip p-values [S, T] from per-input paired effects [S, M, T] and weights [S, M] or [S, M, T]
    (0/1) by the saddle-point approximation, exact where that is cheap. Rows without inputs get NaN.

    With a = w e and K(t) = Σ log cosh(t a_m) the cumulant generating function of S = Σ ε_m a_m,
    solve K'(t̂) = s⁻ (Newton, vectorised) and take

        w = √(2 (t̂ s⁻ − K(t̂))),  u = (2/Δ) sinh(t̂ Δ/2) √K''(t̂),
        P(S ≥ s) ≈ 1 − Φ(w) + φ(w) (1/u − 1/w),  p = min(1, 2 P(S ≥ s)).

    Continuity correction: S is discrete. When every |a_m| is equal it lives on a lattice of span
    Δ = 2|a|, and s⁻ = s − Δ/2 with the sinh form of u is Daniels' second continuity correction,
    accurate to the atom (the uncorrected form is off by half an atom, up to a factor 2.5 there).
    For unequal |a_m| there is no lattice; Δ = 2 min|a_m| (the gap below the largest atom) keeps
    the lattice case exact and tends to the continuous form as the smallest effect goes to 0.

    Exact instead: s = 0 or a single nonzero input give 1; an entry with at most
    `exact_max_inputs` nonzero |a_m| below the gap (Σ|a| − s)/2 is counted exactly (every entry
    with that few inputs, and the far tail, where the saddle point is least accurate); s = Σ|a|
    gives 2 / 2^k (k nonzero a_m), which is also the floor of every p-value.
    """
    a, n = _effects(per_input, weight)
    S, T, M = a.shape
    out = np.full((S, T), np.nan)
    has = n > 0                                                 # [S, T]
    if not has.any():
        return out
    a = a[has]                                                  # [E, M]
    s = np.abs(a.sum(1))
    absa = np.abs(a)
    total = absa.sum(1)
    k = (absa > 0).sum(1)
    p = _edge_exact(absa, s, k, exact_max_inputs)
    p[s <= _REL_TOL * total] = 1.0                              # includes all-zero entries
    sp = np.isnan(p)
    if sp.any():
        p[sp] = np.clip(2.0 * _saddle_tail(a[sp], s[sp]), np.exp2(1.0 - k[sp]), 1.0)
    out[has] = p
    return out
