"""compare_estimators: Jacobian against clamping on planted ground truth and on a tiny random Llama."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.analysis import compare_estimators, effect_pvalues, relative_error
from jfig.analysis.compare import agreement, check_same_inputs
from jfig.measure import Effects, feature_list, measure_effects
from jfig.models.forward import init_params
from tests.support.planted import TOKENS as PTOKENS, planted
from tests.support.tiny_models import tiny_config

TANH_CLAMP = np.tanh(1.5) - np.tanh(0.5)      # clamp 0.5 -> 1.5 of t3 = 1 + tanh(s4), per unit
TANH_JAC = 1 - np.tanh(0.5) ** 2              # its slope at the operating point s4 = 0.5


@pytest.fixture(scope="module")
def planted_cmp():
    model, s0, s1 = planted()
    return compare_estimators(model, [s0, s1], {"resid0": range(5)}, PTOKENS, targets={"resid1": range(10)},
                              alphas=(0.5, 1.5), top=5, correction="none", alpha=0.05, progress=False)


def test_linear_pairs_agree_exactly_and_tanh_pair_tops_the_table(planted_cmp):
    jac, clamp = planted_cmp.effects["jacobian"], planted_cmp.effects["clamp"]
    linear = [(0, 0), (1, 1), (2, 2), (3, 2)]                 # t0 = 2 s0, t1 = 5 − 1.5 s1, t2 = s2 s3 (linear in each)
    a = np.array([jac.mean[r, c] for r, c in linear])
    b = np.array([clamp.mean[r, c] for r, c in linear])
    np.testing.assert_allclose(a, [2.0, -1.5, b[2], 0.8], atol=1e-5)
    assert np.sign(a).tolist() == np.sign(b).tolist()
    assert relative_error(a, b).max() < 1e-6
    p = planted_cmp.pairs[0]
    assert (p.a, p.b) == ("jacobian", "clamp")
    assert p.sign_agreement == 1.0 and p.sign_agreement_all == 1.0
    assert p.n_nonnegligible == 5 and p.n_either == 5           # four linear pairs and the tanh pair
    # relative errors over the five: four zeros and the tanh pair's
    tanh_rel = (TANH_JAC - TANH_CLAMP) / TANH_JAC
    assert p.rel_error_median == pytest.approx(0.0, abs=1e-6)
    assert p.rel_error_p90 == pytest.approx(np.percentile([0, 0, 0, 0, tanh_rel], 90), rel=1e-4)
    t = p.disagreements.to_pylist()
    assert (t[0]["source_feature"], t[0]["target_feature"]) == (4, 3)
    assert t[0]["mean_a"] == pytest.approx(TANH_JAC, abs=1e-5)
    assert t[0]["mean_b"] == pytest.approx(TANH_CLAMP, abs=1e-5)
    assert t[0]["rel_error"] == pytest.approx(tanh_rel, rel=1e-4)
    assert t[0]["worst_gaps"][0] == pytest.approx(TANH_JAC - TANH_CLAMP, abs=1e-5)   # the same gap on every input
    assert all(r["rel_error"] < 1e-6 for r in t[1:])
    # significance (the build's robust p-value): constant per-input values on n inputs give the exact
    # sign-flip p = 2 / 2^n: 0.0078 for the three pairs measured on 8 inputs, which pass at 0.05
    # uncorrected in both methods; 0.125 for the two whose source s3 fires on 4 of them, which cannot
    assert p.n_significant_both == 3 and p.n_significant_only_a == 0 and p.n_significant_only_b == 0
    assert planted_cmp.pvalues["jacobian"][0, 0] == pytest.approx(2 / 2 ** 8, rel=1e-9)
    assert np.nanmax(planted_cmp.pvalues["clamp"][np.array([r for r, _ in linear]), np.array([c for _, c in linear])]) \
        == pytest.approx(2 / 2 ** 4, rel=1e-9)
    s = planted_cmp.summary()
    assert "sign agreement 1.0000" in s and "resid0:4 -> resid1:3" in s
    d = json.loads(json.dumps(planted_cmp.as_dict(), allow_nan=False))
    assert d["pairs"][0]["disagreements"][0]["target_feature"] == 3


def test_methods_see_the_same_inputs(planted_cmp):
    jac, clamp = planted_cmp.effects["jacobian"], planted_cmp.effects["clamp"]
    np.testing.assert_array_equal(jac.input_index, clamp.input_index)
    np.testing.assert_array_equal(jac.input_weight, clamp.input_weight)
    assert jac.input_weight[3].sum() == 4                     # s3 fires on the even rows only


def test_different_inputs_are_refused():
    model, s0, s1 = planted()
    kw = dict(targets={"resid1": range(10)}, inputs_per_source=3, keep_per_input=True, progress=False)
    e0 = measure_effects(model, [s0, s1], {"resid0": [0]}, PTOKENS, method="jacobian", seed=0, **kw)
    e1 = measure_effects(model, [s0, s1], {"resid0": [0]}, PTOKENS, method="clamp", seed=1, **kw)
    assert not np.array_equal(e0.input_index, e1.input_index)
    with pytest.raises(jfig.JfigError, match="different inputs"):
        check_same_inputs({"jacobian": e0, "clamp": e1})
    check_same_inputs({"jacobian": e0, "clamp": e0})


def _effects(per_input, method):
    per_input = np.asarray(per_input, np.float32)              # [S, M, T]
    S, M, T = per_input.shape
    saes = {"a": jfig.SAE.init_random(jax.random.PRNGKey(0), 4, S, "blocks.0.hook_resid_post"),
            "b": jfig.SAE.init_random(jax.random.PRNGKey(1), 4, T, "blocks.1.hook_resid_post")}
    saes = {s.site: s for s in saes.values()}
    return Effects(mean=per_input.mean(1), var=per_input.var(1, ddof=1), n=np.full((S, T), M, np.float32),
                   sources=feature_list({"blocks.0.hook_resid_post": range(S)}, saes),
                   targets=feature_list({"blocks.1.hook_resid_post": range(T)}, saes), method=method,
                   positions="same", per_input=per_input, input_weight=np.ones((S, M), np.float32),
                   input_index=np.tile(np.arange(M, dtype=np.int32), (S, 1)))


def test_significance_decisions_and_signs_are_counted():
    rng = np.random.default_rng(0)
    M = 40
    strong = 1.0 + 0.1 * rng.standard_normal(M)           # clearly positive
    noise = rng.standard_normal(M)
    noise -= noise.mean()                                  # mean 0 (+1e-3 below): never significant
    # targets: 0 significant in both (same sign), 1 only in a, 2 only in b, 3 significant in both, opposite signs
    a = np.stack([strong, strong, noise + 1e-3, strong], -1)[None]
    b = np.stack([strong, noise + 1e-3, strong, -strong], -1)[None]
    ea, eb = _effects(a, "jacobian"), _effects(b, "clamp")
    p = agreement(ea, eb, effect_pvalues(ea), effect_pvalues(eb), alpha=0.01, correction="bonferroni",
                  negligible=0.5, top=2)
    assert (p.n_significant_both, p.n_significant_only_a, p.n_significant_only_b) == (2, 1, 1)
    assert p.n_significant_opposite == 1
    assert p.sign_agreement_significant == 0.5
    assert p.n_nonnegligible == 2 and p.sign_agreement == 0.5      # targets 0 and 3
    assert p.n_either == 4
    assert p.sign_agreement_all == pytest.approx(3 / 4)
    top = p.disagreements.to_pylist()
    assert top[0]["target_feature"] == 3 and top[0]["rel_error"] == pytest.approx(2.0, rel=1e-5)
    assert len(top) == 2


class _Tok:
    """A stand-in tokenizer: token i decodes to 'w<i> '."""
    vocab_size = 50

    def decode(self, ids):
        return "".join(f"w{int(i)} " for i in ids)


def test_tiny_llama_end_to_end():
    cfg = tiny_config("llama")
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2), tokenizer=_Tok())
    src, tgt = "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"
    s1 = jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 32, src)
    s3 = jfig.SAE.init_random(jax.random.PRNGKey(2), 16, 24, tgt)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(10, 6)))
    vals = np.asarray(s1.encode(model.run(toks, capture=(src,), stop_at=src).cache[src]))
    feats = np.argsort(-(vals > 0).mean((0, 1)))[:2]            # the two most frequent source features
    cmp = jfig.compare_estimators(model, [s1, s3], {src: feats}, toks, targets={tgt: range(24)},
                                  inputs_per_source=6, top=4, progress=False)
    assert isinstance(cmp, jfig.EstimatorComparison)
    p = cmp.pairs[0]
    jac, clamp = cmp.effects["jacobian"], cmp.effects["clamp"]
    assert jac.mean.shape == clamp.mean.shape == (2, 24)
    ok = np.isfinite(jac.mean) & np.isfinite(clamp.mean)
    assert p.n_pairs == ok.sum() == 48
    same = np.sign(jac.mean[ok]) == np.sign(clamp.mean[ok])
    assert p.sign_agreement_all == pytest.approx(same.mean())
    assert 0 <= p.n_nonnegligible <= p.n_either <= p.n_pairs
    assert p.n_significant_both + p.n_significant_only_a <= p.n_pairs
    rows = p.disagreements.to_pylist()
    gaps = [abs(r["mean_a"] - r["mean_b"]) for r in rows]
    assert len(rows) == 4 and gaps == sorted(gaps, reverse=True)
    assert gaps[0] == pytest.approx(np.nanmax(np.abs(jac.mean - clamp.mean)), rel=1e-6)
    for r in rows:                                              # contexts mark the clamped (strongest) position
        i, ctx = r["worst_inputs"][0], r["worst_contexts"][0]
        f = int(r["source_feature"])
        pos = int(np.argmax(vals[i, :, f]))
        assert f"[[w{int(toks[i, pos])} ]]" in ctx
    s = cmp.summary()
    assert f"{p.n_pairs} pairs measured by both" in s
    assert json.loads(json.dumps(cmp.as_dict(), allow_nan=False))["n_targets"] == 24


def test_bad_arguments():
    model, s0, s1 = planted()
    with pytest.raises(jfig.JfigError, match="two or more"):
        compare_estimators(model, [s0, s1], {"resid0": [0]}, PTOKENS, methods=("clamp",))
    with pytest.raises(jfig.JfigError, match="unknown method"):
        compare_estimators(model, [s0, s1], {"resid0": [0]}, PTOKENS, methods=("clamp", "gradient"))
    with pytest.raises(jfig.JfigError, match="keep_per_input"):
        compare_estimators(model, [s0, s1], {"resid0": [0]}, PTOKENS, keep_per_input=False)
