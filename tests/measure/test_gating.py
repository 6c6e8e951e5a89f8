"""Gating measurements: the three statistics against hand computations, modulators at earlier sites,
the random-modulator control and the calibration of the t test."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import binom

import jfig
from jfig.measure import measure_gating
from jfig.models.config import llama_config
from jfig.models.forward import init_params
from jfig.stats import decide, robust_pvalues, t_pvalues


def _identity(site, d):
    return jfig.SAE(W_enc=jnp.eye(d), b_enc=jnp.zeros(d), W_dec=jnp.eye(d), b_dec=jnp.zeros(d), threshold=None,
                    site=site, architecture="relu", apply_b_dec_to_input=False)


def _three_site_model(vocab=20, seed=0):
    """Sites a -> b -> c, identity SAEs over 4 features, everything active.

    b0 = 1 + a0 + 0.5 a1 (the modulator a1 also drives the source b0), b1 = 1 + a2, b2 = b3 = 1;
    c0 = 3 + b0 a1 + b0² + tanh(a1) (gated: mixed term 1 once b0 is clamped), c1 = 3 + b1, c2 = 3 + a3,
    c3 = 3 + tanh(b0) + a1² (smooth, no mixed term)."""
    X = jax.random.uniform(jax.random.PRNGKey(seed), (vocab, 4), minval=0.5, maxval=1.5)

    def apply(p, tokens, hook):
        a = hook("a", p["X"][tokens])
        one = jnp.ones(a.shape[:-1])
        b = hook("b", jnp.stack([1 + a[..., 0] + 0.5 * a[..., 1], 1 + a[..., 2], one, one], -1))
        c = jnp.stack([3 + b[..., 0] * a[..., 1] + b[..., 0] ** 2 + jnp.tanh(a[..., 1]), 3 + b[..., 1],
                       3 + a[..., 3], 3 + jnp.tanh(b[..., 0]) + a[..., 1] ** 2], -1)
        return hook("c", c) @ p["U"]

    params = {"X": X, "U": jax.random.normal(jax.random.PRNGKey(seed + 1), (4, vocab))}
    model = jfig.Model.from_function(apply, params, sites=("a", "b", "c"), vocab_size=vocab,
                                     site_widths={"a": 4, "b": 4, "c": 4})
    return model, [_identity(s, 4) for s in ("a", "b", "c")]


TOKS = jnp.asarray(np.random.default_rng(0).integers(0, 20, size=(12, 5)))


def test_mixed_derivative_equals_factorial_contrast_on_a_smooth_model():
    """t = s_i s_k + separable smooth terms: the mixed derivative is 1 at every operating point and the
    factorial contrast is 1 for any levels; a separable pair has both 0."""
    def apply(p, tokens, hook):
        a = hook("a", p["X"][tokens])
        t = jnp.stack([3 + a[..., 0] * a[..., 1] + jnp.tanh(a[..., 0]) + a[..., 1] ** 2 + 0.5 * a[..., 2],
                       3 + jnp.sin(a[..., 2]) + a[..., 3] ** 3, 3 + a[..., 0] * a[..., 1] * a[..., 2],
                       jnp.ones(a.shape[:-1])], -1)
        return hook("c", t) @ p["U"]

    X = jax.random.uniform(jax.random.PRNGKey(3), (20, 4), minval=0.5, maxval=1.5)
    model = jfig.Model.from_function(apply, {"X": X, "U": jnp.ones((4, 20))}, sites=("a", "c"), vocab_size=20,
                                     site_widths={"a": 4, "c": 4})
    saes = [_identity("a", 4), _identity("c", 4)]
    pairs = [(("a", 0), ("a", 1)), (("a", 2), ("a", 3))]
    kw = dict(targets={"c": range(4)}, inputs_per_pair=8, keep_per_input=True)
    mixed = measure_gating(model, saes, pairs, TOKS, method="mixed", **kw)
    fact = measure_gating(model, saes, pairs, TOKS, method="factorial", alphas=(0.7, 1.4), **kw)
    for g in (mixed, fact):
        assert (g.n[0] == 8).all()
        np.testing.assert_allclose(g.mean[0, :2], [1.0, 0.0], atol=2e-4)
        np.testing.assert_allclose(g.mean[1], 0.0, atol=2e-4)
        w = g.input_weight[0] > 0
        np.testing.assert_allclose(g.var[0], g.per_input[0][w].var(0, ddof=1), rtol=1e-3, atol=1e-8)
    # t2 = s0 s1 s2: the mixed derivative is s2 at the operating point, the factorial contrast s2 too
    # (linear in each clamped feature), input by input
    w = mixed.input_weight[0] > 0
    np.testing.assert_allclose(mixed.per_input[0][w][:, 2], fact.per_input[0][w][:, 2], atol=2e-4)
    np.testing.assert_allclose(mixed.per_input[0][w][:, 0], fact.per_input[0][w][:, 0], atol=2e-4)


def test_modulator_at_an_earlier_site_matches_hand_computation():
    model, saes = _three_site_model()
    pairs = [(("b", 0), ("a", 1)), (("b", 1), ("a", 1))]
    lo, hi = 0.7, 1.6
    kw = dict(targets={"c": range(4)}, inputs_per_pair=6, keep_per_input=True)
    fact = measure_gating(model, saes, pairs, TOKS, method="factorial", alphas=(lo, hi), **kw)
    mixed = measure_gating(model, saes, pairs, TOKS, method="mixed", **kw)
    # the contrast of c0 = α_i α_k + α_i² + tanh(α_k) is exactly 1; b0's dependence on a1 is cut by the clamp
    np.testing.assert_allclose(fact.mean[0], [1.0, 0.0, 0.0, 0.0], atol=2e-4)
    np.testing.assert_allclose(mixed.mean[0], [1.0, 0.0, 0.0, 0.0], atol=2e-4)
    np.testing.assert_allclose(fact.mean[1], 0.0, atol=2e-4)
    # by hand: full runs with two Clamp edits (a1 at its site, b0 set at its own), per input
    sa, sb, sc = saes
    for m in range(6):
        tk = TOKS[m][None]
        base = model.run(tk, capture=("b",))
        fi = np.asarray(base.cache["b"][0, :, 0])
        cm = np.arange(len(fi)) == np.argmax(fi)

        def run(ai, ak):
            out = model.run(tk, edits=(jfig.Clamp(sa, 1, ak, positions=jnp.asarray(cm)),
                                       jfig.Clamp(sb, 0, ai, positions=jnp.asarray(cm))), capture=("c",))
            return np.asarray(sc.encode(out.cache["c"])[0])[cm].mean(0)

        hand = (run(hi, hi) - run(hi, lo) - run(lo, hi) + run(lo, lo)) / (hi - lo) ** 2
        np.testing.assert_allclose(fact.per_input[0, m], hand, atol=2e-4)
    with pytest.raises(jfig.JfigError, match="modulator site 'b' comes after source site 'a'"):
        measure_gating(model, saes, [(("a", 1), ("b", 0))], TOKS, method="factorial", targets={"c": [0]})


def test_cross_site_pair_on_a_built_in_model_equals_full_runs():
    """The prefix starts at the modulator's site and the source is set in the suffix (run_suffix)."""
    cfg = llama_config(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=50,
                       max_seq_len=16)
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2))
    sites = [f"blocks.{l}.hook_resid_post" for l in range(3)]
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i + 1), 16, 24, s) for i, s in enumerate(sites)]
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(8, 6)))
    pairs = [((sites[1], 2), (sites[0], 5))]
    lo, hi = 0.5, 2.0
    g = measure_gating(model, saes, pairs, toks, method="factorial", alphas=(lo, hi), targets={sites[2]: range(6)},
                       inputs_per_pair=3, keep_per_input=True)
    enc1 = np.asarray(saes[1].encode(model.run(toks, capture=(sites[1],)).cache[sites[1]])[..., 2])
    done = 0
    for m in range(3):
        if g.input_weight[0, m] == 0:
            continue
        inp = [i for i in range(8) if enc1[i].max() > 0]
        # recover the input index the same way the measurement chose it: compare against every candidate
        cands = []
        for i in inp:
            cm = np.arange(6) == np.argmax(enc1[i])

            def run(ai, ak, i=i, cm=cm):
                out = model.run(toks[i][None], edits=(jfig.Clamp(saes[0], 5, ak, positions=jnp.asarray(cm)),
                                                      jfig.Clamp(saes[1], 2, ai, positions=jnp.asarray(cm))),
                                capture=(sites[2],))
                return np.asarray(saes[2].encode(out.cache[sites[2]])[0, :, :6])[cm].mean(0)

            cands.append((run(hi, hi) - run(hi, lo) - run(lo, hi) + run(lo, lo)) / (hi - lo) ** 2)
        err = min(np.abs(c - g.per_input[0, m]).max() for c in cands)
        assert err < 2e-4
        done += 1
    assert done >= 1


def test_random_modulator_null():
    model, saes = _three_site_model()
    pairs = [(("b", 0), ("a", 1)), (("b", 0), ("b", 2))]
    kw = dict(targets={"c": range(4)}, inputs_per_pair=6, alphas=(0.7, 1.6))
    a = measure_gating(model, saes, pairs, TOKS, method="factorial", direction="random", seed=1, **kw)
    b = measure_gating(model, saes, pairs, TOKS, method="factorial", direction="random", seed=1, **kw)
    c = measure_gating(model, saes, pairs, TOKS, method="factorial", direction="random", seed=2, **kw)
    np.testing.assert_array_equal(a.mean, b.mean)                      # seeded
    assert np.abs(a.mean - c.mean).max() > 1e-4                         # another seed, another direction
    assert np.abs(a.mean[0, 0]) > 1e-3                                  # a random direction also touches a1
    with pytest.raises(jfig.JfigError, match="conditional statistic never edits it"):
        measure_gating(model, saes, pairs, TOKS, method="conditional", direction="random", **kw)


def _skewed_null_model(seed, vocab=256, d=6, n_t=8):
    """t_j = 40 + Σ_{i<k} x_i x_k g_ikj(token): sources fire (value 1.5) on half the vocabulary each;
    g_ikj is centred exponential (skewed), exactly mean zero over the tokens where i fires, so the
    factorial contrast of (i, k) on j has mean zero over i's inputs: no gate anywhere."""
    rng = np.random.default_rng(seed)
    x = np.zeros((vocab, d), np.float32)
    fires = []
    for i in range(d):
        on = rng.permutation(vocab)[: vocab // 2]
        x[on, i] = 1.5
        fires.append(on)
    g = np.zeros((vocab, d, d, n_t), np.float32)
    for i in range(d):
        for k in range(i + 1, d):
            v = rng.exponential(1.0, (vocab, n_t))
            v[fires[i]] -= v[fires[i]].mean(0)
            g[:, i, k] = v
    params = {"X": jnp.asarray(x), "G": jnp.asarray(g), "U": jnp.ones((n_t, vocab))}

    def apply(p, tokens, hook):
        a = hook("a", p["X"][tokens])
        t = 40.0 + jnp.einsum("bsi,bsk,bsikj->bsj", a, a, p["G"][tokens])
        return hook("c", t) @ p["U"]

    model = jfig.Model.from_function(apply, params, sites=("a", "c"), vocab_size=vocab,
                                     site_widths={"a": d, "c": n_t})
    return model, [_identity("a", d), _identity("c", n_t)]


def test_gating_pvalues_control_the_family_wise_error_on_a_skewed_null():
    """No gate anywhere, per-input contrasts skewed (centred exponential): over 12 families of 120
    tests, Bonferroni at α = 0.05 must reject in no more families than a binomial(12, α) allows, and
    per test at most α plus three standard errors. The build's p-value (`robust_pvalues`) holds it;
    Student's t on the same values fails the same check (1 family against 6 of 12 when written)."""
    alpha, seeds, d = 0.05, 12, 6
    pairs = [(("a", i), ("a", k)) for i in range(d) for k in range(i + 1, d)]
    errors, errors_t, rejected, tested = 0, 0, 0, 0
    for seed in range(seeds):
        model, saes = _skewed_null_model(seed)
        toks = jnp.asarray(np.random.default_rng(100 + seed).integers(0, 256, size=(96, 4)))
        g = measure_gating(model, saes, pairs, toks, method="factorial", alphas=(1.0, 2.0), inputs_per_pair=32,
                           seed=seed, chunk_size=15, keep_per_input=True)
        assert (g.n >= 20).all()
        p = robust_pvalues(g.per_input, g.input_weight).ravel()
        errors += int(decide(g.mean.ravel(), p, alpha=alpha, correction="bonferroni").keep.any())
        p_t = t_pvalues(g.mean, g.var, g.n).ravel()
        errors_t += int(decide(g.mean.ravel(), p_t, alpha=alpha, correction="bonferroni").keep.any())
        rejected += int((p < alpha).sum())
        tested += p.size
    assert errors <= binom.ppf(0.99, seeds, alpha), (errors, errors_t)     # family-wise error ≤ α (binomial slack)
    assert errors_t > binom.ppf(0.99, seeds, alpha)                   # the check can fail: t does (6 of 12)
    assert rejected / tested <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / tested)   # and per test
