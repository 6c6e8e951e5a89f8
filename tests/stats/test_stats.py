"""Significance machinery: permutation p-values, corrections, calibration on nulls."""
import numpy as np
from hypothesis import given, settings, strategies as st

from jfig import stats


def test_sign_flip_detects_shift_and_is_calibrated_under_null():
    rng = np.random.default_rng(0)
    S, M, T = 40, 24, 50
    e = rng.normal(size=(S, M, T))
    w = np.ones((S, M))
    p = stats.sign_flip_pvalues(e, w, n_perm=400, seed=1)
    # calibration: under the null, P(p < a) <= a (+ binomial slack)
    for a in (0.01, 0.05, 0.2):
        frac = (p < a).mean()
        slack = 3 * np.sqrt(a * (1 - a) / p.size)
        assert frac <= a + slack, (a, frac)
    e2 = e.copy()
    e2[0, :, 0] += 2.0
    p2 = stats.sign_flip_pvalues(e2, w, n_perm=400, seed=1)
    assert p2[0, 0] <= 1 / 401 + 1e-12
    w2 = w.copy()
    w2[3] = 0
    assert np.isnan(stats.sign_flip_pvalues(e, w2, n_perm=50)[3]).all()


def test_sign_flip_matches_exact_enumeration_for_small_m():
    rng = np.random.default_rng(2)
    e = rng.normal(size=(1, 6, 3)) + 0.5
    w = np.ones((1, 6))
    import itertools
    obs = np.abs(e[0].mean(0))
    signs = np.array(list(itertools.product([-1, 1], repeat=6)))
    null = np.abs(signs @ e[0] / 6)
    exact = (null >= obs - 1e-12).mean(0)
    p = stats.sign_flip_pvalues(e, w, n_perm=20000, seed=3)[0]
    np.testing.assert_allclose(p, exact, atol=0.02)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_bh_matches_reference(ps):
    p = np.array(ps)
    q = stats.benjamini_hochberg(p)
    m = len(p)
    # reference: q_i = min_{j >= rank(i)} p_(j) m / j
    order = np.argsort(p)
    ref = np.empty(m)
    sp = p[order]
    for r in range(m):
        ref[order[r]] = min(1.0, min(sp[j] * m / (j + 1) for j in range(r, m)))
    np.testing.assert_allclose(q, ref, atol=1e-12)
    assert (stats.bonferroni(p) >= p - 1e-15).all()


def test_label_permutation_and_threshold():
    rng = np.random.default_rng(4)
    g = np.arange(40) % 2 == 0
    e = rng.normal(size=(40, 5))
    e[g, 0] += 3
    p = stats.label_permutation_pvalue(e, g, n_perm=500)
    assert p[0] < 0.01 and np.all(p[1:] > 0.001)
    assert stats.null_threshold(np.array([0.1, -0.2, 5.0, np.nan]), 0.5) == 0.2
    keep, adj = stats.significant(np.array([1.0, -2.0, 0.01]), np.array([1e-5, 1e-5, 1e-5]), tau=0.1)
    assert keep.tolist() == [True, True, False]
    assert stats.edge_kind(np.array([1.0, -2.0])).tolist() == ["excitatory", "inhibitory"]


def test_normal_approximation_agrees_with_monte_carlo():
    rng = np.random.default_rng(5)
    e = rng.normal(size=(20, 32, 10)) + rng.normal(size=(20, 1, 10)) * 0.3
    w = np.ones((20, 32))
    mc = stats.sign_flip_pvalues(e, w, n_perm=4000, seed=0)
    nrm = stats.sign_flip_normal_pvalues(e, w)
    assert np.abs(mc - nrm).max() < 0.05
    e[0, :, 0] = 1.0 + 0.01 * rng.normal(size=32)        # a consistent effect: tiny p resolved
    assert stats.sign_flip_normal_pvalues(e, w)[0, 0] < 1e-7
