"""The skewness-corrected t test and the robust p-value: exact reductions, special cases, and the level
they hold in the far tail when per-input effects are skewed (where the sign-flip test and Student's t
do not)."""
import numpy as np
import pytest
from scipy.stats import ttest_1samp

from jfig import stats


def calibration(p, level):
    """Observed rejection rate at `level` divided by `level`."""
    return float((p < level).mean() / level)


def test_symmetric_sample_reduces_to_students_t():
    """With a sample mirrored about its mean the skewness is 0 and Hall's statistic is the t statistic."""
    rng = np.random.default_rng(0)
    half = rng.exponential(size=(3, 10, 5))
    shift = rng.normal(size=(3, 1, 5))
    e = np.concatenate([half, -half], axis=1) + shift                    # skewness exactly 0
    ref = ttest_1samp(e, 0.0, axis=1).pvalue
    np.testing.assert_allclose(stats.skew_corrected_t_pvalues(e, np.ones((3, 20))), ref, rtol=1e-9)


def test_weights_select_inputs():
    rng = np.random.default_rng(1)
    e = rng.exponential(size=(2, 30, 4)) - 0.8
    w = (rng.random((2, 30)) < 0.6).astype(np.float32)
    got = stats.skew_corrected_t_pvalues(e, w)
    for s in range(2):
        keep = w[s] > 0
        np.testing.assert_allclose(got[s], stats.skew_corrected_t_pvalues(e[s:s + 1, keep], np.ones((1, keep.sum())))[0])
    pair_w = np.broadcast_to(w[..., None], e.shape)                    # per-pair weights give the same
    np.testing.assert_allclose(stats.skew_corrected_t_pvalues(e, pair_w), got)


def test_special_cases():
    same = np.full((1, 8, 1), 0.3)
    assert stats.skew_corrected_t_pvalues(same, np.ones((1, 8)))[0, 0] == 0.0       # no spread, non-zero mean
    assert stats.skew_corrected_t_pvalues(np.zeros((1, 8, 1)), np.ones((1, 8)))[0, 0] == 1.0
    assert np.isnan(stats.skew_corrected_t_pvalues(np.ones((1, 4, 1)), np.array([[1.0, 0, 0, 0]])))[0, 0]
    assert np.isnan(stats.robust_pvalues(np.ones((1, 4, 1)), np.zeros((1, 4))))[0, 0]
    # one input: the sign-flip value (1) stands where the t test is undefined
    assert stats.robust_pvalues(np.ones((1, 4, 1)), np.array([[1.0, 0, 0, 0]]))[0, 0] == 1.0


def test_monotone_in_the_shift_on_both_sides():
    """p rises to 1 and falls again as a skewed sample is shifted through zero (the transformation
    is monotone, so neither side folds back)."""
    rng = np.random.default_rng(2)
    base = rng.exponential(size=(1, 24, 1))
    base -= base.mean()
    shifts = np.linspace(-3.0, 3.0, 121)
    p = np.array([stats.skew_corrected_t_pvalues(base + d, np.ones((1, 24)))[0, 0] for d in shifts])
    top = int(np.argmax(p))
    assert np.all(np.diff(p[: top + 1]) >= -1e-12) and np.all(np.diff(p[top:]) <= 1e-12)
    assert p[0] < 1e-5 and p[-1] < 1e-6 and p[top] > 0.9


def test_a_large_effect_against_the_skew_keeps_its_power():
    """−1 on 80% of inputs and 0 on the rest (skewness +1.5, against the effect): the plain cubic
    flattens there (p ≈ 1e-3 at n = 32); past the clip the statistic continues with slope 1."""
    e = np.concatenate([np.full(26, -1.0), np.zeros(6)])[None, :, None]
    p = stats.skew_corrected_t_pvalues(e, np.ones((1, 32)))[0, 0]
    assert p < 1e-8
    assert stats.robust_pvalues(e, np.ones((1, 32)))[0, 0] < 1e-6


def test_robust_is_the_larger_of_the_two():
    rng = np.random.default_rng(3)
    e = rng.lognormal(size=(4, 30, 6)) - 1.2
    w = np.ones((4, 30))
    np.testing.assert_array_equal(stats.robust_pvalues(e, w),
                                  np.fmax(stats.sign_flip_saddlepoint_pvalues(e, w),
                                          stats.skew_corrected_t_pvalues(e, w)))


@pytest.mark.parametrize("n", [32, 64])
def test_skewed_null_far_tail(n):
    """Centred exponential per-input effects (skewness 2): mean zero, not symmetric. At the levels
    Bonferroni uses, Student's t and the sign-flip test reject several times too often; the
    skewness correction brings the rate to within a small factor at n = 32 and near the level at
    n = 64 (rates measured over 60,000 tests; the binomial standard error at 1e-3 is about 13%)."""
    rng = np.random.default_rng(n)
    e = rng.exponential(size=(300, n, 200)) - 1.0
    w = np.ones((300, n))
    plain = ttest_1samp(e, 0.0, axis=1).pvalue
    sign_flip = stats.sign_flip_saddlepoint_pvalues(e, w)
    corrected = stats.skew_corrected_t_pvalues(e, w)
    robust = stats.robust_pvalues(e, w)
    level = 1e-3
    assert calibration(plain, level) > 4 and calibration(sign_flip, level) > 4      # what goes wrong without
    bound = 2.5 if n == 32 else 1.6
    assert calibration(corrected, level) < bound and calibration(robust, level) < bound
    assert calibration(robust, 0.05) < 1.15                                         # and in the bulk


def test_symmetric_heavy_tailed_null_keeps_its_level():
    """Student t(3) effects are symmetric: the sign-flip test is exact, the noisy skewness estimate
    alone would over-reject, and the robust p-value (their maximum) holds the level."""
    rng = np.random.default_rng(5)
    e = rng.standard_t(3, size=(300, 32, 200))
    w = np.ones((300, 32))
    for level in (1e-2, 1e-3):
        assert calibration(stats.robust_pvalues(e, w), level) < 1.3


def test_power_for_a_consistent_skewed_effect():
    """A real effect with skewed per-input values still reaches Bonferroni levels for a million tests."""
    rng = np.random.default_rng(6)
    e = rng.exponential(size=(1, 64, 50)) * 0.5 + 0.4
    assert (stats.robust_pvalues(e, np.ones((1, 64))) < 0.01 / 1e6).all()
