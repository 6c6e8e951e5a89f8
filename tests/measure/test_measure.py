"""The measurement engine against naive loops, finite differences and planted ground truth."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.measure import measure_effects, measure_gating, weight_effects
from jfig.models.config import llama_config
from jfig.models.forward import init_params
from tests.support.planted import TOKENS as PTOKENS, planted

SRC, TGT = "blocks.1.hook_resid_post", "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    cfg = llama_config(n_layers=4, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=50,
                       max_seq_len=32)
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2))
    s1 = jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 32, SRC)
    s3 = jfig.SAE.init_random(jax.random.PRNGKey(2), 16, 24, TGT)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(10, 6)))
    return model, s1, s3, toks


def _naive(model, s1, s3, toks, eff, method, pos, clamp_at="single"):
    """One full forward per source, input and level, with jfig.Clamp edits — the loop a user writes.
    Slopes per unit of source: (hi − lo) / (α_hi − α_lo) for clamps, (clean − ablated) / f_i for ablation."""
    out = np.zeros_like(eff.per_input)
    for r, (site, f) in enumerate(eff.sources):
        lo, hi = eff.alphas[r]
        for m in range(eff.per_input.shape[1]):
            tk = toks[eff.input_index[r, m]][None]
            base = model.run(tk, capture=(site, TGT))
            fi = np.asarray(s1.encode(base.cache[site])[0, :, f])
            cm = fi > 0
            if clamp_at == "single" and cm.any():
                cm = np.arange(len(fi)) == np.argmax(fi)
            started = np.cumsum(cm) > 0
            rm = {"same": cm, "later": started & ~cm, "all": started}[pos].astype(np.float32)
            if rm.sum() == 0 or eff.input_weight[r, m] == 0:
                continue

            def read(o):
                v = jnp.concatenate([s1.encode(o.cache[site])[0], s3.encode(o.cache[TGT])[0]], -1)
                return (rm[:, None] * np.asarray(v)).sum(0) / rm.sum()

            def at(a):
                return read(model.run(tk, edits=(jfig.Clamp(s1, f, a, positions=jnp.asarray(cm)),), capture=(site, TGT)))

            if method == "clamp":
                out[r, m] = (at(hi) - at(lo)) / (hi - lo)
            else:
                out[r, m] = (read(base) - at(0.0)) / fi[cm].mean()
    return out


@pytest.mark.parametrize("method,pos,clamp_at", [("clamp", "same", "single"), ("clamp", "later", "single"),
                                                 ("ablate", "all", "single"), ("clamp", "same", "all_active"),
                                                 ("ablate", "all", "all_active")])
def test_engine_equals_naive_loop(tiny, method, pos, clamp_at):
    model, s1, s3, toks = tiny
    eff = measure_effects(model, [s1, s3], {SRC: [0, 3, 5]}, toks, method=method, positions=pos,
                          clamp_at=clamp_at, inputs_per_source=3, keep_per_input=True, progress=False, chunk_size=2)
    ref = _naive(model, s1, s3, toks, eff, method, pos, clamp_at)
    w = eff.input_weight[..., None]
    np.testing.assert_allclose(eff.per_input * w, ref * w, atol=2e-5)
    # mean / var / n agree with the per-input values
    for r in range(3):
        ok = eff.input_weight[r] > 0
        if ok.sum() > 1:
            np.testing.assert_allclose(eff.mean[r], ref[r][ok].mean(0), atol=2e-5)
            np.testing.assert_allclose(eff.var[r], ref[r][ok].var(0, ddof=1), atol=2e-5)
        assert (eff.n[r] == ok.sum()).all()


def test_no_recompilation_across_chunks(tiny, count_traces):
    model, s1, s3, toks = tiny
    measure_effects(model, [s1, s3], {SRC: [2, 3, 4, 5, 6, 7, 8]}, toks, inputs_per_source=3, chunk_size=2,
                    progress=False)                      # 4 chunks, the last padded
    with count_traces() as traces:
        measure_effects(model, [s1, s3], {SRC: [9, 10, 11, 12, 13, 14, 15]}, toks, inputs_per_source=3,
                        chunk_size=2, progress=False)    # same shapes, other features: no trace at all
    assert traces.count == 0


def _smooth_model():
    """A tiny SiLU Llama with SAEs whose encoders are linear on the data (every latent active)."""
    cfg = llama_config(n_layers=3, d_model=8, n_heads=2, n_kv_heads=1, d_head=4, d_mlp=12, vocab_size=20,
                       max_seq_len=16)
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(5), scale=0.3))
    k1, k2 = jax.random.split(jax.random.PRNGKey(6))
    mk = lambda k, site: jfig.SAE(W_enc=jax.random.normal(k, (8, 6)) * 0.3, b_enc=jnp.full(6, 6.0),  # noqa: E731
                                  W_dec=jax.random.normal(k, (6, 8)) * 0.3, b_dec=jnp.zeros(8), threshold=None,
                                  site=site, architecture="relu", apply_b_dec_to_input=False)
    return model, mk(k1, "blocks.0.hook_resid_post"), mk(k2, "blocks.2.hook_resid_post")


def test_jacobian_matches_central_difference():
    model, sa, sb = _smooth_model()
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 20, size=(4, 5)))
    for method, freeze in (("jacobian", False), ("jacobian_direct", True)):
        eff = measure_effects(model, [sa, sb], {sa.site: [0, 2, 4]}, toks, method=method, positions="all",
                              clamp_at="all_active", targets={sb.site: range(6)}, inputs_per_source=4,
                              keep_per_input=True, progress=False)
        h = 1e-2
        for r, (site, f) in enumerate(eff.sources):
            for m in range(4):
                tk = toks[eff.input_index[r, m]][None]
                d = sa.W_dec[f]

                def read(scale):
                    out = model.run(tk, edits=(jfig.Steer(site, d, scale),), capture=(sb.site,), freeze=freeze)
                    return sb.encode(out.cache[sb.site])[0].mean(0)

                assert bool((sb.pre_activations(model.run(tk, capture=(sb.site,)).cache[sb.site]) > 0).all())
                if method == "jacobian":
                    fd = (read(h) - read(-h)) / (2 * h)
                    ref = eff.per_input[r, m]
                    assert np.abs(ref - fd).max() <= 1e-3 * np.abs(fd).max() + 1e-6
    # the direct effect differs from the total one (norms and attention respond)
    tot = measure_effects(model, [sa, sb], {sa.site: [0]}, toks, method="jacobian", targets={sb.site: range(6)},
                          progress=False)
    direct = measure_effects(model, [sa, sb], {sa.site: [0]}, toks, method="jacobian_direct",
                             targets={sb.site: range(6)}, progress=False)
    assert np.abs(tot.mean - direct.mean).max() > 1e-4


def test_planted_estimators_get_sign_and_size():
    model, s0, s1 = planted()
    tg = {"resid1": range(10)}
    jac = measure_effects(model, [s0, s1], {"resid0": range(5)}, PTOKENS, method="jacobian", targets=tg,
                          progress=False)
    clamp = measure_effects(model, [s0, s1], {"resid0": range(5)}, PTOKENS, method="clamp", targets=tg,
                            alphas=(0.5, 1.5), progress=False)
    abl = measure_effects(model, [s0, s1], {"resid0": range(5)}, PTOKENS, method="ablate", targets=tg,
                          progress=False)
    np.testing.assert_allclose(jac.mean[0, 0], 2.0, atol=1e-5)
    np.testing.assert_allclose(jac.mean[1, 1], -1.5, atol=1e-5)
    s3_mean = float(np.mean(1.2 * (np.asarray(PTOKENS) % 2 == 0)))          # s2 fires everywhere
    np.testing.assert_allclose(jac.mean[2, 2], s3_mean, atol=1e-5)          # ∂(s2 s3)/∂s2 = s3
    np.testing.assert_allclose(jac.mean[3, 2], 0.8, atol=1e-5)              # read where s3 fires: s2 = 0.8
    np.testing.assert_allclose(jac.mean[4, 3], 1 - np.tanh(0.5) ** 2, atol=1e-5)
    np.testing.assert_allclose(clamp.mean[4, 3], np.tanh(1.5) - np.tanh(0.5), atol=1e-5)
    # one sign and unit for every estimator: ablation's (clean − ablated) / f_i is the same slope
    np.testing.assert_allclose(abl.mean[0, 0], 2.0, atol=1e-5)
    np.testing.assert_allclose(abl.mean[1, 1], -1.5, atol=1e-5)
    np.testing.assert_allclose(clamp.mean[0, 0], 2.0, atol=1e-5)
    np.testing.assert_allclose(clamp.mean[1, 1], -1.5, atol=1e-5)
    for e in (jac, clamp, abl):
        off = np.abs(e.mean.copy())
        off[[0, 1, 2, 3, 4], [0, 1, 2, 2, 3]] = 0
        assert off.max() < 1e-5                                         # nothing where nothing is planted
    # smooth + nonlinear: a small clamp gap around the natural value equals the Jacobian
    small = measure_effects(model, [s0, s1], {"resid0": [4]}, PTOKENS, method="clamp", targets=tg,
                            alphas=(0.5 - 1e-2, 0.5 + 1e-2), progress=False)
    np.testing.assert_allclose(small.mean[0, 3], jac.mean[4, 3], rtol=1e-3)


def test_planted_gating_found_only_where_planted():
    model, s0, s1 = planted()
    tg = {"resid1": range(10)}
    pairs = [(("resid0", 2), ("resid0", 3)), (("resid0", 0), ("resid0", 1)), (("resid0", 4), ("resid0", 0))]
    mixed = measure_gating(model, [s0, s1], pairs, PTOKENS, method="mixed", targets=tg)
    fact = measure_gating(model, [s0, s1], pairs, PTOKENS, method="factorial", targets=tg, alphas=(0.5, 1.5))
    cond = measure_gating(model, [s0, s1], pairs, PTOKENS, method="conditional", targets=tg, alphas=(0.5, 1.5))
    # at odd tokens s3 = 0, so t2 = 0 sits at the target ReLU's kink: the derivative is masked there,
    # while the factorial design sets s3 to its clamp levels everywhere and sees the full gate.
    even = float(np.mean(np.asarray(PTOKENS) % 2 == 0))
    np.testing.assert_allclose(mixed.mean[0, 2], even, atol=1e-4)
    np.testing.assert_allclose(fact.mean[0, 2], 1.0, atol=1e-4)
    for g in (mixed, fact):
        rest = np.abs(g.mean.copy())
        rest[0, 2] = 0
        assert rest.max() < 1e-4
    np.testing.assert_allclose(cond.mean[0, 2], 1.2, atol=1e-4)
    assert np.nanmax(np.abs(cond.mean[0, [0, 1, 3, 4]])) < 1e-5


def test_mixed_derivative_matches_factorial_and_vanishes_on_linear_model():
    model, sa, sb = _smooth_model()
    toks = jnp.asarray(np.random.default_rng(2).integers(0, 20, size=(4, 5)))
    pairs = [((sa.site, 0), (sa.site, 1)), ((sa.site, 2), (sa.site, 5))]
    mixed = measure_gating(model, [sa, sb], pairs, toks, method="mixed", targets={sb.site: range(6)},
                           positions="all")
    assert np.abs(mixed.mean).max() > 1e-6
    # linear model (identity map between the sites): no interaction at all
    lin = jfig.Model.from_function(lambda p, t, hook: hook("b", 3.0 * hook("a", p["E"][t]) + 1.0) @ p["E"].T,
                                   {"E": jax.random.normal(jax.random.PRNGKey(0), (20, 8))}, sites=("a", "b"),
                                   vocab_size=20)
    la = jfig.SAE(W_enc=jnp.eye(8), b_enc=jnp.full(8, 10.0), W_dec=jnp.eye(8), b_dec=jnp.zeros(8), threshold=None,
                  site="a", architecture="relu", apply_b_dec_to_input=False)
    lb = jfig.SAE(W_enc=jnp.eye(8), b_enc=jnp.full(8, 10.0), W_dec=jnp.eye(8), b_dec=jnp.zeros(8), threshold=None,
                  site="b", architecture="relu", apply_b_dec_to_input=False)
    g = measure_gating(lin, [la, lb], [(("a", 0), ("a", 1))], toks, method="mixed", targets={"b": range(8)})
    assert np.abs(g.mean).max() < 1e-6


def test_relu_threshold_crossing_separates_clamp_from_jacobian():
    """A target inactive at the operating point has Jacobian 0, but a large clamp can switch it on."""
    model, s0, s1 = planted()
    gated = jfig.SAE(W_enc=jnp.eye(10), b_enc=jnp.zeros(10), W_dec=jnp.eye(10), b_dec=jnp.zeros(10),
                     threshold=jnp.full(10, 2.5), site="resid1", architecture="jumprelu", apply_b_dec_to_input=False)
    jac = measure_effects(model, [s0, gated], {"resid0": [0]}, PTOKENS, method="jacobian", targets={"resid1": [0]},
                          progress=False)
    clamp = measure_effects(model, [s0, gated], {"resid0": [0]}, PTOKENS, method="clamp", targets={"resid1": [0]},
                            alphas=(0.5, 1.5), progress=False)
    assert jac.mean[0, 0] == 0.0                          # t0 = 2 < 2.5: inactive, derivative masked
    np.testing.assert_allclose(clamp.mean[0, 0], 3.0, atol=1e-5)   # (JumpReLU(3) − JumpReLU(1)) / 1


def test_weight_effects_direct_term():
    model, sa, sb = _smooth_model()
    w = weight_effects([sa, sb], {sa.site: [0, 3]})
    cols = w.targets.at(sb.site)
    np.testing.assert_allclose(w.mean[0, cols], np.asarray(sa.W_dec[0] @ sb.W_enc), rtol=1e-5)
    np.testing.assert_allclose(w.mean[1, cols], np.asarray(sa.W_dec[3] @ sb.W_enc), rtol=1e-5)


def test_bad_input_errors(tiny):
    model, s1, s3, toks = tiny
    with pytest.raises(jfig.JfigError, match="unknown method"):
        measure_effects(model, [s1, s3], {SRC: [0]}, toks, method="clampy")
    with pytest.raises(jfig.JfigError, match="out of range"):
        measure_effects(model, [s1, s3], {SRC: [99]}, toks)
    with pytest.raises(jfig.SiteError, match="no SAE"):
        measure_effects(model, [s3], {SRC: [0]}, toks)
    wrong = jfig.SAE.init_random(jax.random.PRNGKey(0), 12, 8, SRC)
    with pytest.raises(jfig.ShapeError, match="does not match site"):
        measure_effects(model, [wrong], {SRC: [0]}, toks)
    nan_model = jfig.Model.from_config(model.config, jax.tree.map(lambda a: a * jnp.nan, model.params))
    with pytest.raises(jfig.ShapeError, match="NaN"):
        measure_effects(nan_model, [s1, s3], {SRC: [0]}, toks, progress=False)


SHARD_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np, jfig
    from jfig.measure import measure_effects
    from jfig.models.config import llama_config
    from jfig.models.forward import init_params
    assert len(jax.devices()) == 4, jax.devices()
    cfg = llama_config(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=50, max_seq_len=16)
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2))
    s1 = jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 32, "blocks.0.hook_resid_post")
    s2 = jfig.SAE.init_random(jax.random.PRNGKey(2), 16, 24, "blocks.2.hook_resid_post")
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(8, 5)))
    kw = dict(inputs_per_source=3, progress=False, keep_per_input=True)
    one = measure_effects(model, [s1, s2], {{"blocks.0.hook_resid_post": range(10)}}, toks, devices=1, **kw)
    four = measure_effects(model, [s1, s2], {{"blocks.0.hook_resid_post": range(10)}}, toks, devices=4, **kw)
    np.testing.assert_allclose(np.nan_to_num(four.mean), np.nan_to_num(one.mean), atol=1e-5)
    np.testing.assert_array_equal(four.n, one.n)
    print("SHARDED-OK")
''')


def test_sharded_over_four_cpu_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    tests_dir = os.path.dirname(os.path.dirname(__file__))
    res = subprocess.run([sys.executable, "-c", SHARD_SCRIPT.format(tests=tests_dir)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert "SHARDED-OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("method", ["jacobian", "jacobian_direct"])
@pytest.mark.parametrize("positions", ["same", "all"])
def test_reverse_mode_equals_forward_mode(tiny, method, positions):
    model, s1, s3, toks = tiny
    kw = dict(method=method, positions=positions, targets={TGT: [0, 5]}, inputs_per_source=4, keep_per_input=True,
              progress=False)
    fwd = measure_effects(model, [s1, s3], {SRC: range(8)}, toks, mode="forward", **kw)
    rev = measure_effects(model, [s1, s3], {SRC: range(8)}, toks, mode="reverse", **kw)
    np.testing.assert_array_equal(rev.n, fwd.n)
    np.testing.assert_allclose(np.nan_to_num(rev.mean), np.nan_to_num(fwd.mean), atol=1e-5)
    np.testing.assert_allclose(rev.per_input * rev.input_weight[..., None],
                               fwd.per_input * fwd.input_weight[..., None], atol=1e-5)


def test_reverse_mode_on_a_wrapped_model():
    model, s0, s1 = planted()
    kw = dict(method="jacobian", targets={"resid1": [0, 2, 3]}, progress=False)
    fwd = measure_effects(model, [s0, s1], {"resid0": range(5)}, PTOKENS, mode="forward", **kw)
    rev = measure_effects(model, [s0, s1], {"resid0": range(5)}, PTOKENS, mode="reverse", **kw)
    np.testing.assert_allclose(rev.mean, fwd.mean, atol=1e-5)


def test_mean_ablation_on_planted_model():
    """s3 fires (1.2) on even tokens only; mean-ablating it sets it to its mean over all tokens."""
    model, s0, s1 = planted()
    eff = measure_effects(model, [s0, s1], {"resid0": [3]}, PTOKENS, method="mean_ablate", targets={"resid1": [2]},
                          progress=False)
    # t2 = s2 s3 with s2 = 0.8: (t2(clean) − t2(s3 → mean)) / (s3 − mean) = 0.8, the slope the clamp and the
    # Jacobian measure too (the change itself, 0.8 (1.2 − mean), has the opposite sign of an ablation's).
    np.testing.assert_allclose(eff.mean[0, 0], 0.8, atol=1e-5)
