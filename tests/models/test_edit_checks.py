"""Edits checked before running (indices, widths, shapes, positions), per-token clamp values, and
derivatives of a read-out with respect to a clamp value under grad, jit, vmap, jacfwd and hessian."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jfig
from jfig.edits import Ablate, Clamp, Compose, Patch, Steer
from jfig.saes import SAE
from tests.support.tiny_models import tiny_model

SITE = "blocks.1.hook_resid_post"
LATER = "blocks.3.hook_resid_post"
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 7)))
OTHER = jnp.asarray(np.random.default_rng(1).integers(0, 50, size=(2, 7)))
FAST = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", scale=0.2)


@pytest.fixture(scope="module")
def sae():
    return SAE.init_random(jax.random.PRNGKey(1), 16, 32, SITE)


# ------------------------------------------------------------------------- checks before running

def test_bad_feature_indices_are_refused_before_tracing(model, sae, count_traces):
    bad = [Clamp(sae, 40, 1.0), (Ablate(sae, -1),),
           Compose(Steer(SITE, jnp.ones(16)), Clamp(sae, jnp.array([3, 32]), 1.0))]
    with count_traces() as traces:
        with pytest.raises(jfig.ShapeError, match=r"Clamp at blocks\.1\.hook_resid_post: feature index 40 is out "
                                                  r"of range for an SAE with d_sae 32"):
            model.run(TOKENS, edits=bad[0])
        with pytest.raises(jfig.ShapeError, match="Ablate at blocks.1.hook_resid_post: feature index -1 is out of "):
            model.run(TOKENS, edits=bad[1])
        with pytest.raises(jfig.ShapeError, match="feature index 32 is out of range"):
            model.run(TOKENS, edits=bad[2])
    assert traces.count == 0
    with pytest.raises(jfig.ShapeError, match="Clamp at blocks.1.hook_resid_post: feature indices must be integers, "
                                              "got float32"):
        Clamp(sae, jnp.float32(2.0), 1.0)
    with pytest.raises(jfig.ShapeError, match="feature indices must be integers, got bool"):
        Ablate(sae, True)
    with pytest.raises(jfig.ShapeError, match=r"an int array \[n\], got shape \(2, 2\)"):
        Clamp(sae, [[1, 2], [3, 4]], 1.0)


def test_wrong_widths_and_shapes_are_refused(model, sae):
    with pytest.raises(jfig.ShapeError, match=r"Steer at blocks\.1\.hook_resid_post: direction has width 12, "
                                              r"expected 16 \(the site's width\)"):
        model.run(TOKENS, edits=Steer(SITE, jnp.ones(12), 2.0))
    with pytest.raises(jfig.ShapeError, match=r"Patch at blocks\.1\.hook_resid_post: values shape \(2, 5, 16\) "
                                              r"does not broadcast to the activations \(2, 7, 16\)"):
        model.run(TOKENS, edits=Patch(SITE, jnp.zeros((2, 5, 16))))
    with pytest.raises(jfig.ShapeError, match=r"Clamp at blocks\.1\.hook_resid_post: value shape \(5,\) does not "
                                              r"broadcast to \(2, 7\); expected a scalar, \[seq\] or \[batch, seq\]"):
        model.run(TOKENS, edits=Clamp(sae, 3, jnp.ones(5)))
    with pytest.raises(jfig.ShapeError, match=r"value shape \(2, 7\) does not broadcast to \(2, 7, 3\)"):
        model.run(TOKENS, edits=Clamp(sae, jnp.array([1, 2, 3]), jnp.ones((2, 7))))
    z = "blocks.1.attn.hook_z"       # [batch, seq, n_heads=4, d_head=4]: a flat [16] direction does not fit
    with pytest.raises(jfig.ShapeError, match=r"Steer at blocks\.1\.attn\.hook_z: direction shape \(16,\) does not "
                                              r"broadcast to the activations \(2, 7, 4, 4\)"):
        model.run(TOKENS, edits=Steer(z, jnp.ones(16)))
    model.run(TOKENS, edits=Steer(z, jnp.ones((4, 4))))          # the site's trailing shape fits


def test_bad_positions_are_refused(model, sae):
    with pytest.raises(jfig.ShapeError, match=r"Clamp at blocks\.1\.hook_resid_post: position 9 is out of range for "
                                              r"a sequence of length 7 \(expected -7 <= position < 7\)"):
        model.run(TOKENS, edits=Clamp(sae, 3, 1.0, positions=[2, 9]))
    with pytest.raises(jfig.ShapeError, match="position -8 is out of range"):
        model.run(TOKENS, edits=Steer(SITE, jnp.ones(16), positions=-8))
    with pytest.raises(jfig.ShapeError, match="Patch at blocks.1.hook_resid_post: position mask has length 5, "
                                              "expected the sequence length 7"):
        model.run(TOKENS, edits=Patch(SITE, 0.0, positions=jnp.ones(5, bool)))
    with pytest.raises(jfig.ShapeError, match="position mask has 3 rows, expected 1 or the batch size 2"):
        model.run(TOKENS, edits=Ablate(sae, 1, positions=jnp.ones((3, 7), bool)))
    # negative positions count from the end
    a = model.run(TOKENS, edits=Clamp(sae, 3, 2.0, positions=[-1])).logits
    b = model.run(TOKENS, edits=Clamp(sae, 3, 2.0, positions=[6])).logits
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_prefix_and_suffix_runs_check_edits(model, sae):
    with pytest.raises(jfig.ShapeError, match="Clamp at blocks.1.hook_resid_post: feature index 99 is out of range"):
        model.prefix(TOKENS, "blocks.2.hook_resid_post", edits=Clamp(sae, 99, 1.0))
    pre = model.prefix(TOKENS, SITE)
    with pytest.raises(jfig.ShapeError, match=r"values shape \(2, 5, 16\) does not broadcast to the activations "
                                              r"\(2, 7, 16\)"):
        model.run_suffix(pre, edits=Patch("blocks.2.hook_resid_post", jnp.zeros((2, 5, 16))))
    with pytest.raises(jfig.ShapeError, match="position 7 is out of range"):
        model.run_suffix(pre, edits=Clamp(sae, 3, 1.0, positions=[7]))


def test_wrapped_function_edits_are_checked(sae):
    def apply(params, tokens, hook):
        return hook(SITE, params["E"][tokens]) @ params["E"].T

    m = jfig.Model.from_function(apply, {"E": jnp.ones((50, 16))}, sites=(SITE,), vocab_size=50)
    with pytest.raises(jfig.ShapeError, match="feature index 32 is out of range"):
        m.run(TOKENS, edits=Clamp(sae, 32, 1.0))
    with pytest.raises(jfig.ShapeError, match="position 7 is out of range"):
        m.run(TOKENS, edits=Ablate(sae, 1, positions=[7]))
    # the width is unknown on the host; the traced shape is checked when the edit applies
    with pytest.raises(jfig.ShapeError, match="Steer at blocks.1.hook_resid_post: direction has width 12, expected 16"):
        m.run(TOKENS, edits=Steer(SITE, jnp.ones(12)))


def test_traced_edits_skip_value_checks(model, sae):
    eager = model.run(TOKENS, edits=Clamp(sae, 3, 2.0, positions=[1, 4])).logits
    jitted = jax.jit(lambda f, v, p: model.run(TOKENS, edits=Clamp(sae, f, v, positions=p)).logits)
    np.testing.assert_allclose(jitted(3, 2.0, jnp.array([1, 4])), eager, atol=1e-6)
    # shapes of traced leaves are still checked
    with pytest.raises(jfig.ShapeError, match=r"value shape \(5,\) does not broadcast"):
        jax.jit(lambda v: model.run(TOKENS, edits=Clamp(sae, 3, v)).logits)(jnp.ones(5))


# ------------------------------------------------------------------------- per-token clamp values

def _active_sae(model, architecture, feats):
    """An SAE at SITE whose `feats` are active at every token of TOKENS and OTHER (b_enc above ||x||)."""
    s = SAE.init_random(jax.random.PRNGKey(2), 16, 32, SITE, architecture=architecture)
    norm = max(float(jnp.linalg.norm(model.run(t, capture=(SITE,), stop_at=SITE).cache[SITE], axis=-1).max())
               for t in (TOKENS, OTHER))
    return dataclasses.replace(s, b_enc=s.b_enc.at[jnp.asarray(feats)].set(norm + 1.0))


@FAST
@given(feats=st.lists(st.integers(0, 31), min_size=1, max_size=3, unique=True), single=st.booleans())
def test_clamp_to_own_per_token_values_changes_nothing(model, sae, feats, single):
    base = model.run(TOKENS, capture=(SITE, LATER))
    f = sae.encode(base.cache[SITE])
    feature = feats[0] if single else jnp.asarray(feats)
    value = f[..., feats[0]] if single else f[..., jnp.asarray(feats)]          # [batch, seq] or [batch, seq, n]
    out = model.run(TOKENS, edits=Clamp(sae, feature, value), capture=(SITE, LATER))
    for site in (SITE, LATER):
        np.testing.assert_allclose(out.cache[site], base.cache[site], atol=1e-5)
    np.testing.assert_allclose(out.logits, base.logits, atol=1e-5)


@FAST
@given(feature=st.integers(0, 31), architecture=st.sampled_from(["relu", "jumprelu"]),
       per=st.sampled_from(["seq", "batch_seq"]))
def test_clamp_to_other_runs_values_sets_the_feature(model, feature, architecture, per):
    s = _active_sae(model, architecture, [feature])
    other = s.encode(model.run(OTHER, capture=(SITE,), stop_at=SITE).cache[SITE])[..., feature]   # [batch, seq]
    value = other[0] if per == "seq" else other
    clean = model.run(TOKENS, capture=(SITE,), stop_at=SITE).cache[SITE]
    out = model.run(TOKENS, edits=Clamp(s, feature, value), capture=(SITE,), stop_at=SITE).cache[SITE]
    want = jnp.broadcast_to(value, (2, 7))
    np.testing.assert_allclose(s.encode(out)[..., feature], want, rtol=1e-5, atol=1e-5)
    # error-preserving: the change is (v - f_i) * d_i at every token
    f_clean = s.encode(clean)[..., feature]
    np.testing.assert_allclose(out - clean, (want - f_clean)[..., None] * s.W_dec[feature], atol=1e-5)


@FAST
@given(feats=st.lists(st.integers(0, 31), min_size=2, max_size=3, unique=True))
def test_several_features_per_token_add_their_decoded_contributions(model, sae, feats):
    fi = jnp.asarray(feats)
    value = jax.random.uniform(jax.random.PRNGKey(len(feats)), (2, 7, len(feats)), minval=0.0, maxval=3.0)
    clean = model.run(TOKENS, capture=(SITE,), stop_at=SITE).cache[SITE]
    out = model.run(TOKENS, edits=Clamp(sae, fi, value), capture=(SITE,), stop_at=SITE).cache[SITE]
    want = jnp.einsum("bsn,nd->bsd", value - sae.encode(clean)[..., fi], sae.W_dec[fi])
    np.testing.assert_allclose(out - clean, want, atol=1e-5)


def test_value_shapes_agree(model, sae):
    per_seq = jnp.linspace(-1.0, 2.0, 7)
    a = model.run(TOKENS, edits=Clamp(sae, 4, per_seq)).logits
    b = model.run(TOKENS, edits=Clamp(sae, 4, jnp.broadcast_to(per_seq, (2, 7)))).logits
    c = model.run(TOKENS, edits=Clamp(sae, jnp.array([4]), per_seq[:, None])).logits      # [seq, n]
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
    # with positions, only those tokens take their per-token value
    masked = model.run(TOKENS, edits=Clamp(sae, 4, per_seq, positions=[3]), capture=(SITE,)).cache[SITE]
    single = model.run(TOKENS, edits=Clamp(sae, 4, per_seq[3], positions=[3]), capture=(SITE,)).cache[SITE]
    np.testing.assert_allclose(masked, single, atol=1e-6)


def test_vmapped_per_token_clamps_equal_a_loop(model, sae):
    feats = jnp.array([1, 5, 9])
    values = jax.random.uniform(jax.random.PRNGKey(3), (3, 2, 7), minval=-1.0, maxval=3.0)

    def one(f, v):
        return model.run(TOKENS, edits=Clamp(sae, f, v)).logits

    batched = jax.vmap(one)(feats, values)
    looped = jnp.stack([one(int(f), v) for f, v in zip(feats, values)])
    np.testing.assert_allclose(batched, looped, atol=1e-5)


# ------------------------------------------------------------------------- derivatives

READ = 3    # position of the read-out; clamps after it cannot reach it
LOGIT = 11


def _float64_model(key):
    """A wrapped model computed wholly in float64 (build with x64 enabled): embedding at SITE, a
    causal running mean, a tanh layer at LATER, logits. Smooth, so finite differences are exact to ~1e-9."""
    k1, k2 = jax.random.split(key)
    params = {"E": jax.random.normal(k1, (50, 16), jnp.float64), "W": jax.random.normal(k2, (16, 16), jnp.float64) / 4}

    def apply(params, tokens, hook):
        h = hook(SITE, params["E"][tokens])
        h = jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1)[:, None]
        h = hook(LATER, jnp.tanh(h @ params["W"]))
        return jnp.tanh(h @ params["W"]) @ params["E"].T

    return jfig.Model.from_function(apply, params, sites=(SITE, LATER), vocab_size=50,
                                    site_widths={SITE: 16, LATER: 16})


def _fd(fn, v, h=1e-5):
    return (fn(v + h) - fn(v - h)) / (2 * h)


def test_grad_jit_vmap_of_readouts_match_finite_differences():
    with jax.enable_x64(True):
        m = _float64_model(jax.random.PRNGKey(5))
        s = SAE.init_random(jax.random.PRNGKey(6), 16, 32, SITE, dtype=jnp.float64)
        t = SAE.init_random(jax.random.PRNGKey(7), 16, 8, LATER, dtype=jnp.float64)

        def logit(v):                                  # clamp value -> one logit
            return m.run(TOKENS[:1], edits=Clamp(s, 5, v)).logits[0, READ, LOGIT]

        def target(v):                                 # clamp value -> a target SAE feature's pre-activation
            x = m.run(TOKENS[:1], edits=Clamp(s, 5, v), capture=(LATER,), stop_at=LATER).cache[LATER]
            return t.pre_activations(x)[0, READ, 2]

        v = jnp.float64(1.5)
        for fn in (logit, target):
            g = jax.grad(fn)(v)
            assert g.dtype == jnp.float64 and abs(float(g)) > 1e-3
            np.testing.assert_allclose(g, _fd(fn, v), rtol=1e-7)
            np.testing.assert_allclose(jax.jit(jax.grad(fn))(v), g, rtol=1e-12)
        vs = jnp.array([-1.0, 0.5, 1.5], jnp.float64)
        np.testing.assert_allclose(jax.vmap(jax.grad(logit))(vs), [_fd(logit, x) for x in vs], rtol=1e-7)


def test_jacfwd_and_hessian_of_per_token_values():
    with jax.enable_x64(True):
        m = _float64_model(jax.random.PRNGKey(5))
        s = SAE.init_random(jax.random.PRNGKey(6), 16, 32, SITE, dtype=jnp.float64)

        def readout(v):                                # per-token values [seq] -> one logit
            edit = Clamp(s, jnp.array([5, 9]), jnp.stack([v, 2 * v], -1))           # value [seq, n=2]
            return m.run(TOKENS[:1], edits=edit).logits[0, READ, LOGIT]

        v = jnp.linspace(0.5, 2.0, 7, dtype=jnp.float64)
        eye = jnp.eye(7, dtype=jnp.float64)
        jac = jax.jacfwd(readout)(v)                                             # [seq]
        np.testing.assert_allclose(jac, jax.grad(readout)(v), rtol=1e-10)
        assert np.all(np.asarray(jac)[READ + 1:] == 0.0)                        # later tokens cannot reach it
        fd = [_fd(lambda h: readout(v + h * eye[i]), 0.0) for i in range(READ + 1)]
        np.testing.assert_allclose(jac[:READ + 1], fd, rtol=1e-7)

        hess = jax.hessian(readout)(v)                                           # [seq, seq]
        assert np.abs(np.asarray(hess)).max() > 1e-4
        np.testing.assert_allclose(hess, hess.T, atol=1e-12)
        assert np.all(np.asarray(hess)[READ + 1:] == 0.0)
        grad = jax.jit(jax.grad(readout))
        fd2 = np.stack([_fd(lambda h: grad(v + h * eye[i]), 0.0) for i in range(READ + 1)])
        np.testing.assert_allclose(hess[:READ + 1], fd2, rtol=1e-6, atol=1e-10)


def test_grad_through_builtin_model_matches_finite_difference(model, sae):
    """The built-in forward keeps norms and attention scores in float32: a coarser step and tolerance."""
    def logit(v):
        return model.run(TOKENS[:1], edits=Clamp(sae, 5, v)).logits[0, READ, LOGIT]

    g = jax.grad(logit)(1.5)
    assert abs(float(g)) > 1e-3
    np.testing.assert_allclose(g, _fd(logit, 1.5, h=1e-2), rtol=2e-3)
