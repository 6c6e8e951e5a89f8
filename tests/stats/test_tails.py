"""Sign-flip tails: the saddle-point approximation against exact enumeration, its calibration, the
floors of each test, Student's t for gating, and the warning when Bonferroni cannot be met."""
import itertools
import logging

import numpy as np
import pytest
from scipy.special import erfc

from jfig import stats
from jfig.pipeline.options import BuildOptions
from jfig.pipeline.stages import first_order_edges


def skewed(kind, rng, n, T):
    """Per-input effects [1, n, T] that are skewed and mostly of one sign (a real effect)."""
    if kind == "lognormal":
        return rng.lognormal(0, 1, size=(1, n, T)) * np.where(rng.random((1, n, T)) < 0.8, 1, -1)
    if kind == "exponential":
        return rng.exponential(size=(1, n, T)) - 0.3
    if kind == "mixture":
        e = rng.normal(size=(1, n, T)) * 0.2 + 0.3
        e[:, :3] *= rng.choice([1, 10], size=(1, 3, T))
        return e
    return np.where(rng.random((1, n, T)) < 0.75, 1.0, -1.0)          # "lattice": equal magnitudes


def test_exact_enumeration_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9):
        e = rng.normal(size=(2, n, 7)) + 0.3
        signs = np.array(list(itertools.product([-1, 1], repeat=n)))
        ref = (np.abs(np.einsum("bm,smt->sbt", signs, e)) >= np.abs(e.sum(1))[:, None] - 1e-9).mean(1)
        np.testing.assert_allclose(stats.sign_flip_exact_pvalues(e, np.ones((2, n))), ref)


@pytest.mark.parametrize("kind", ["lognormal", "exponential", "mixture", "lattice"])
@pytest.mark.parametrize("n", [12, 20])
def test_saddlepoint_tracks_exact_enumeration(kind, n):
    rng = np.random.default_rng(n)
    e = skewed(kind, rng, n, 2000)
    w = np.ones((1, n))
    exact = stats.sign_flip_exact_pvalues(e, w)[0]
    normal = stats.sign_flip_normal_pvalues(e, w)[0]
    # the library default: exact wherever at most 16 inputs can flip, the saddle point elsewhere
    err = np.abs(np.log10(stats.sign_flip_saddlepoint_pvalues(e, w)[0] / exact))
    assert np.quantile(err, 0.95) < 0.1 and err.max() < 0.3, (np.quantile(err, 0.95), err.max())
    if n <= stats.tails.AUTO_EXACT_INPUTS:
        np.testing.assert_allclose(stats.sign_flip_saddlepoint_pvalues(e, w)[0], exact, rtol=1e-9)
    # the saddle point alone (exact only at s = Σ|a|): small typical error, below the normal's floor
    sp = stats.sign_flip_saddlepoint_pvalues(e, w, exact_max_inputs=0)[0]
    d = np.log10(sp / exact)
    err = np.abs(d)
    err_normal = np.abs(np.log10(normal / exact))
    tail = exact < 1e-3
    assert np.median(err) < 0.06 and np.quantile(err, 0.9) < 0.2, (np.median(err), np.quantile(err, 0.9))
    assert err[~tail].max() < 0.5 and d.min() > -0.4     # in the far tail errors lean conservative
    if tail.any():
        assert np.median(err[tail]) < 0.5 * np.median(err_normal[tail])
    assert sp.min() < erfc(np.sqrt(n / 2)) or exact.min() >= erfc(np.sqrt(n / 2))


def test_special_cases_are_exact():
    e = np.zeros((1, 6, 5))
    e[0, :, 1] = [0, 0, 2.0, 0, 0, 0]                  # a single nonzero input
    e[0, :, 2] = [1, 2, 3, 4, 5, 6.0]                  # s = Σ|a|: 2 / 2^6
    e[0, :, 3] = [1, -1, 2, -2, 0.5, -0.5]             # s = 0
    e[0, :, 4] = [1, 2, 3, 4, 5, -0.1]
    w = np.ones((1, 6))
    for kw in ({}, {"exact_max_inputs": 0}):
        p = stats.sign_flip_saddlepoint_pvalues(e, w, **kw)[0]
        np.testing.assert_allclose(p[:4], [1, 1, 2 / 64, 1])
    assert stats.sign_flip_saddlepoint_pvalues(e, w)[0, 4] == stats.sign_flip_exact_pvalues(e, w)[0, 4] == 4 / 64
    w[0, 2] = 0                                        # a dropped input; a row without inputs is NaN
    np.testing.assert_allclose(stats.sign_flip_saddlepoint_pvalues(e, w)[0, 2], 2 / 32)
    assert np.isnan(stats.sign_flip_saddlepoint_pvalues(e, np.zeros((1, 6)))).all()
    assert stats.min_attainable_pvalue(0) == 1 and stats.min_attainable_pvalue(32) == 2 / 2 ** 32
    assert stats.min_inputs_for_pvalue(1e-9) == 31 and 2 / 2 ** 31 < 1e-9 <= 2 / 2 ** 30


def test_tiny_pvalues_with_64_inputs():
    rng = np.random.default_rng(3)
    e = rng.lognormal(0, 1, size=(1, 64, 50)) + 0.2
    e[0, :4] *= -0.3                                   # strong but not unanimous effects
    w = np.ones((1, 64))
    sp = stats.sign_flip_saddlepoint_pvalues(e, w, exact_max_inputs=0)
    normal = stats.sign_flip_normal_pvalues(e, w)
    assert np.median(sp) < 1e-14 and (sp < 1e-7).all() and sp.min() >= 2 / 2 ** 64
    assert (normal > 1e-10).all() and (sp < 1e-3 * normal).all()   # skew keeps the normal's z far below √64
    np.testing.assert_allclose(stats.sign_flip_saddlepoint_pvalues(e, w), sp, rtol=0.5)


@pytest.mark.parametrize("skew", [False, True])
def test_saddlepoint_is_calibrated_under_the_null(skew):
    rng = np.random.default_rng(7)
    S, M, T = 40, 32, 400
    mag = rng.exponential(size=(S, M, T)) ** 2 if skew else rng.normal(size=(S, M, T))
    e = mag * rng.choice([-1, 1], size=(S, M, T))      # symmetric under sign flips: the null holds
    p = stats.sign_flip_saddlepoint_pvalues(e, np.ones((S, M)))
    for a in (0.05, 0.01):
        frac = (p < a).mean()
        assert frac <= a + 3 * np.sqrt(a * (1 - a) / p.size), (a, frac)


def test_t_pvalues_for_gating_are_wider_at_small_n():
    mean, var = np.array([1.0, 0.5]), np.array([1.0, 1.0])
    t5 = stats.t_pvalues(mean, var, 5)
    z5 = erfc(np.abs(mean) / np.sqrt(var / 5) / np.sqrt(2))
    assert (t5 > 1.2 * z5).all()
    np.testing.assert_allclose(stats.t_pvalues(mean, var, 10 ** 6), erfc(mean * 1e3 / np.sqrt(2)), rtol=1e-3)
    assert np.isnan(stats.t_pvalues(1.0, np.nan, 5)) and np.isnan(stats.t_pvalues(1.0, 1.0, 1))


def block_records(m: int, n: int, p: float) -> dict:
    return {"source_site": np.array(["a"] * m), "source": np.arange(m), "target_site": np.array(["b"] * m),
            "target": np.arange(m), "mean": np.ones(m), "var": np.ones(m), "n": np.full(m, n),
            "p_value": np.full(m, p), "null_mean": np.full(m, np.nan)}


def test_warning_when_bonferroni_is_unreachable(caplog):
    caplog.set_level(logging.WARNING, logger="jfig")
    opts = BuildOptions.from_dict(dict(alpha=0.01, correction="bonferroni"))
    first_order_edges(block_records(1000, 12, 2 / 2 ** 12), opts)   # needs 1e-5 < 2/2^12
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "m = 1000" in msg and "n = 12 inputs" in msg and "at least 18" in msg and "'bh'" in msg
    caplog.clear()
    first_order_edges(block_records(1000, 32, 1e-9), opts)
    first_order_edges(block_records(1000, 12, 1e-3), BuildOptions.from_dict(dict(correction="bh")))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
