"""Distribution metrics: zero for independent (sparse, skewed) activations within their sampling error,
clearly non-zero for planted dependent pairs (one linear, one that correlation cannot see), equal to
float64 numpy over streamed batches with padding and skipped positions, and from a model run."""
import numpy as np
import pytest

from jfig.testing import tiny_model
from jfig.errors import JfigError, ShapeError
from jfig.interactions import DistributionAccumulator, feature_distribution
from tests.interactions.toys import random_sae, toy_tokens

A, B = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def independent(rng, n, rates, shape=0.7):
    """[n, k] independent activations: active with probability rates[k], gamma(shape) values (skewed)."""
    rates = np.asarray(rates)
    return (rng.random((n, len(rates))) < rates) * rng.gamma(shape, 1.0, (n, len(rates))) * (1 + np.arange(len(rates)))


def quantile_edges(x, bins):
    """[k, bins-2] quantiles of each column's active values."""
    q = np.arange(1, bins - 1) / (bins - 1)
    return np.stack([np.quantile(c[c > 0], q) for c in x.T])


def accumulate(acts: dict, bins, edges=None, *, rows=100, skip=0, n_valid=None):
    d = {s: a.shape[-1] for s, a in acts.items()}
    acc = DistributionAccumulator({s: range(k) for s, k in d.items()}, d, bins=bins, edges=edges, skip_positions=skip)
    n = len(next(iter(acts.values())))
    for lo in range(0, n, rows * 50):
        acc.update({s: a[lo:lo + rows * 50].reshape(rows, 50, -1) for s, a in acts.items()}, n_valid)
    return acc.result()


def null_sd(dist):
    """Standard deviation of the plug-in MI under independence: sqrt(2 df) / (2N)."""
    return np.sqrt(2 * np.maximum(dist.df, 1)) / (2 * dist.n_tokens)


def test_independent_activations_give_zero_within_sampling_error():
    rng = np.random.default_rng(0)
    N, bins = 40_000, 6
    a, b = independent(rng, N, [0.1, 0.3, 0.5, 0.7]), independent(rng, N, [0.2, 0.4, 0.9])
    dist = accumulate({A: a, B: b}, bins, {A: quantile_edges(a, bins), B: quantile_edges(b, bins)})
    off = ~np.eye(7, dtype=bool)
    assert dist.n_tokens == N and dist.corr_se == pytest.approx(N ** -0.5)
    assert np.abs(dist.corr[off]).max() < 4.5 * dist.corr_se
    assert np.nanmin(dist.p_value[off]) > 1e-4
    assert (np.abs(dist.mi_corrected[off]) < 5 * null_sd(dist)[off]).all()
    assert (dist.df[off] == (bins - 1) ** 2).all()      # every bin occupied: the null has its full df


def test_planted_dependent_pairs_are_found():
    rng = np.random.default_rng(1)
    N, bins = 40_000, 6
    x = independent(rng, N, [0.5, 0.5])
    u = rng.uniform(0.0, 2.0, N)                                   # always active
    noise = rng.normal(0, 0.3, N)
    a = np.column_stack([x, u])
    b = np.column_stack([np.maximum(x[:, 0] + noise, 0), np.abs(u - 1.0) + 1e-3])   # linear in x0; |u - 1|
    dist = accumulate({A: a, B: b}, bins, {A: quantile_edges(a, bins), B: quantile_edges(b, bins)})
    lin, sym, indep = (dist.index(A, 0), dist.index(B, 0)), (dist.index(A, 2), dist.index(B, 1)), \
        (dist.index(A, 1), dist.index(B, 0))
    assert dist.corr[lin] > 0.5 and dist.p_value[lin] < 1e-12
    assert abs(dist.corr[sym]) < 4.5 * dist.corr_se                # correlation cannot see it ...
    assert dist.gaussian_mi[sym] < 1e-3
    assert dist.mi_corrected[sym] > 100 * null_sd(dist)[sym] and dist.p_value[sym] < 1e-12   # ... the binned MI does
    assert abs(dist.mi_corrected[indep]) < 5 * null_sd(dist)[indep]
    top = dist.strongest("mi_corrected", 2)
    assert {(t[0], t[1], t[2], t[3]) for t in top} == {(A, 0, B, 0), (A, 2, B, 1)}


def np_mi(x, y, ex, ey):
    """Plug-in MI (nats) of the binned pair and its df, counted with numpy."""
    bx = np.where(x > 0, 1 + (x[:, None] > ex[None]).sum(1), 0)
    by = np.where(y > 0, 1 + (y[:, None] > ey[None]).sum(1), 0)
    J = np.zeros((len(ex) + 2, len(ey) + 2))
    np.add.at(J, (bx, by), 1)
    P = J / J.sum()
    pr, pc = P.sum(1), P.sum(0)
    nz = P > 0
    mi = (P[nz] * np.log(P[nz] / np.outer(pr, pc)[nz])).sum()
    return mi, ((pr > 0).sum() - 1) * ((pc > 0).sum() - 1)


def test_streamed_statistics_equal_numpy():
    """Three batches of [100, 50] with the last 20 rows padding and position 0 skipped."""
    rng = np.random.default_rng(2)
    a, b = independent(rng, 15_000, [0.2, 0.5, 0.8]), independent(rng, 15_000, [0.3, 0.6])
    b[:, 1] += 0.4 * a[:, 1]                                       # some correlation to measure
    bins = 4
    ea, eb = quantile_edges(a, bins), quantile_edges(b, bins)
    dist = accumulate({A: a, B: b}, bins, {A: ea, B: eb}, rows=100, skip=1, n_valid=80)
    keep = np.zeros((3, 100, 50), bool)
    keep[:, :80, 1:] = True
    X = np.column_stack([a, b])[keep.reshape(-1)]
    assert dist.n_tokens == len(X) == 3 * 80 * 49
    np.testing.assert_allclose(dist.mean, X.mean(0), rtol=1e-5)
    np.testing.assert_allclose(dist.cov, np.cov(X.T), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(dist.corr, np.corrcoef(X.T), atol=2e-5)
    E = np.concatenate([ea, eb]).astype(np.float32)
    for p in range(5):
        for q in range(5):
            mi, df = np_mi(X[:, p].astype(np.float32), X[:, q].astype(np.float32), E[p], E[q])
            assert dist.mi[p, q] == pytest.approx(mi, rel=1e-9, abs=1e-12)
            assert dist.df[p, q] == df


def test_model_run_matches_its_activations():
    """feature_distribution over a model equals the numpy statistics of the same encoded activations."""
    model = tiny_model("llama")
    saes = [random_sae(1, 16, 12, "blocks.0.hook_resid_mid", bias=-0.2), random_sae(2, 16, 10, B, bias=-0.2)]
    tokens = toy_tokens(n=12, seq=9, seed=3)
    feats = {saes[0].site: [0, 3, 5, 11], B: [1, 2, 9]}
    edges = {saes[0].site: np.tile([0.2, 0.5], (4, 1)), B: np.tile([0.3, 0.6], (3, 1))}
    dist = feature_distribution(model, saes, tokens, feats, bins=4, edges=edges, batch_size=5)
    out = model.run(tokens, capture=(saes[0].site, B), logits=False)
    X = np.column_stack([np.asarray(s.encode(out.cache[s.site]), np.float64).reshape(-1, s.d_sae)[:, feats[s.site]]
                         for s in saes])
    assert dist.sites == (saes[0].site,) * 4 + (B,) * 3 and dist.n_tokens == 12 * 9
    np.testing.assert_allclose(dist.cov, np.cov(X.T), rtol=1e-4, atol=1e-6)
    E = np.concatenate([edges[saes[0].site], edges[B]])
    mi, _ = np_mi(X[:, 1], X[:, 5], E[1], E[5])
    assert dist.mi[1, 5] == pytest.approx(mi, rel=1e-6, abs=1e-9)


def test_bad_input_is_refused():
    d = {A: 4}
    with pytest.raises(JfigError, match="needs bin edges"):
        DistributionAccumulator({A: [0, 1]}, d, bins=5)
    with pytest.raises(ShapeError, match="edges at"):
        DistributionAccumulator({A: [0, 1]}, d, bins=4, edges={A: np.zeros((2, 3))})
    with pytest.raises(JfigError, match="non-decreasing"):
        DistributionAccumulator({A: [0, 1]}, d, bins=4, edges={A: [[1.0, 0.5], [0.1, 0.2]]})
    with pytest.raises(JfigError, match="out of range"):
        DistributionAccumulator({A: [0, 4]}, d, bins=2)
    with pytest.raises(JfigError, match="bins"):
        DistributionAccumulator({A: [0, 1]}, d, bins=1)
    with pytest.raises(JfigError, match="no SAE width"):
        DistributionAccumulator({B: [0]}, d, bins=2)
    acc = DistributionAccumulator({A: [0, 1]}, d, bins=2)
    with pytest.raises(ShapeError, match="expected"):
        acc.update({A: np.zeros((2, 3, 5))})
    bad = np.ones((2, 3, 4))
    bad[1, 2, 0] = np.nan
    with pytest.raises(JfigError, match="NaN"):
        acc.update({A: bad})
    model = tiny_model("llama")
    with pytest.raises(JfigError, match="no SAE"):
        feature_distribution(model, [random_sae(0, 16, 8, A)], toy_tokens(n=2), {B: [0]}, bins=2)
