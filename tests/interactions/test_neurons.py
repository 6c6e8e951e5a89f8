"""Neuron-level metrics: zero on exactly independent features (disjoint neuron supports) for each MLP
kind, the planted shared neuron singled out with the values of an independent float64 numpy
re-implementation, and bad input refused before any work."""
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.testing import tiny_model
from jfig.errors import JfigError, ShapeError, SiteError
from jfig.interactions import all_pairs, neuron_interactions
from tests.interactions.toys import (PLANTED_GATE, PLANTED_NEURON, PLANTED_UP, SITE, np_act, np_norm_parts,
                                     params64, site_acts, toy_mlp_model, toy_sae, toy_tokens)

FAMILIES = ("gpt2", "llama", "gemma2")    # plain GELU, SiLU-gated, GELU-gated
PAIRS = all_pairs(range(4))               # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


@pytest.mark.parametrize("family", FAMILIES)
def test_disjoint_supports_give_zero(family):
    out = neuron_interactions(toy_mlp_model(family), toy_sae(), PAIRS, toy_tokens())
    assert out.mlp == ("plain" if family == "gpt2" else "gated")
    assert (out.cooccurrence > 0.05).all()          # every pair fires together: the zeros are measured, not NaN
    for name in ("ratio", "hadamard", "expected", "error", "neuron_error"):
        assert np.all(getattr(out, name) == 0.0), name


def reference(model, sae, tokens, a=0, b=1):
    """float64 numpy: the pair's ratio row, expected row, mean output error and per-neuron error where both fire."""
    cfg, p = model.config, params64(model)
    x, f = site_acts(model, sae, tokens, SITE)
    D = np.asarray(sae.W_dec, np.float64)
    gamma = cfg.norm_offset + p["ln2_w"]
    Nd = (D - D.mean(-1, keepdims=True) if cfg.norm == "layer" else D) * gamma
    u, ug = Nd @ p["W_up"], (Nd @ p["W_gate"] if "W_gate" in p else None)
    g, xc = np_norm_parts(cfg, x)
    h = g[:, None] * xc * gamma + p.get("ln2_b", 0.0)
    z, zg = h @ p["W_up"] + p.get("b_up", 0.0), (h @ p["W_gate"] if ug is not None else None)

    def phi(up, gate):
        return np_act(cfg, up) if gate is None else np_act(cfg, gate) * up
    ca, cb = ((g * f[:, k])[:, None] * u[k] for k in (a, b))
    if ug is None:
        e = phi(z, None) - phi(z - ca, None) - phi(z - cb, None) + phi(z - ca - cb, None)
        va, vb = np.abs(u[a]), np.abs(u[b])
    else:
        ga, gb = ((g * f[:, k])[:, None] * ug[k] for k in (a, b))
        e = phi(z, zg) - phi(z - ca, zg - ga) - phi(z - cb, zg - gb) + phi(z - ca - cb, zg - ga - gb)
        va, vb = np.hypot(u[a], ug[a]), np.hypot(u[b], ug[b])
    r, post = np.ones(len(x)), np.ones(cfg.d_model)
    if cfg.post_norms:
        y = phi(z, zg) @ p["W_down"]
        r, post = 1.0 / np.sqrt((y * y).mean(-1) + cfg.norm_eps), cfg.norm_offset + p["ln_mlp_post_w"]
    both = (f[:, a] > 0) & (f[:, b] > 0)
    out_err = np.linalg.norm((e @ p["W_down"]) * post * r[:, None], axis=-1)
    a_dom = va >= vb
    ratio = np.where(a_dom, vb / np.where(va > 0, va, 1), va / np.where(vb > 0, vb, 1))
    if ug is None:
        ratio = np.where(a_dom, u[b] / np.where(u[a] != 0, u[a], 1), u[a] / np.where(u[b] != 0, u[b], 1))
    act = np.where(a_dom, np.mean(f[both, b] / f[both, a]), np.mean(f[both, a] / f[both, b]))
    nerr = (np.abs(e[both]) * r[both, None]).mean(0) * np.linalg.norm(p["W_down"] * post, axis=-1)
    return dict(ratio=ratio, expected=act * np.abs(ratio), error=out_err[both].mean(), neuron_error=nerr,
                hadamard=np.linalg.norm(va * vb), both=both.mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_shared_neuron_is_singled_out(family):
    model, sae, tokens = toy_mlp_model(family, planted=True), toy_sae(), toy_tokens()
    out = neuron_interactions(model, sae, PAIRS, tokens)
    m = PLANTED_NEURON
    for name in ("ratio", "expected", "neuron_error"):
        values = getattr(out, name)
        assert np.count_nonzero(values) == 1 and values[0, m] != 0, name          # pair (0, 1), neuron 20 only
    assert np.count_nonzero(out.hadamard) == 1 and np.count_nonzero(out.error) == 1 and out.error[0] > 0
    assert out.strongest("neuron_error", 1)[0][:3] == (0, 1, m)
    # closed forms from the planted weights: the ratio and the footprint overlap at neuron 20
    if family == "gpt2":
        assert out.ratio[0, m] == pytest.approx(PLANTED_UP[1] / PLANTED_UP[0], rel=1e-6)
        assert out.hadamard[0] == pytest.approx(PLANTED_UP[0] * PLANTED_UP[1], rel=1e-6)
    else:
        v0, v1 = np.hypot(PLANTED_UP[0], PLANTED_GATE[0]), np.hypot(PLANTED_UP[1], PLANTED_GATE[1])
        assert out.ratio[0, m] == pytest.approx(v1 / v0, rel=1e-6)
        assert out.hadamard[0] == pytest.approx(v0 * v1, rel=1e-6)
    assert out.i_dominant[0, m]                      # feature 0 writes more into neuron 20
    ref = reference(model, sae, tokens)
    assert out.cooccurrence[0] == pytest.approx(ref["both"])
    np.testing.assert_allclose(out.ratio[0], ref["ratio"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.expected[0], ref["expected"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.neuron_error[0], ref["neuron_error"], rtol=1e-4, atol=1e-7)
    assert out.error[0] == pytest.approx(ref["error"], rel=1e-4)


def test_weights_only_and_chunking_agree():
    """Without tokens only the weight metrics; a tiny memory budget (one pair per chunk) changes nothing."""
    model, sae, tokens = toy_mlp_model("llama", planted=True), toy_sae(), toy_tokens(n=8)
    weights = neuron_interactions(model, sae, PAIRS)
    assert weights.expected is None and weights.error is None and weights.n_tokens == 0
    full = neuron_interactions(model, sae, PAIRS, tokens, batch_size=3)
    small = neuron_interactions(model, sae, PAIRS, tokens, batch_size=3, memory_budget=1)
    np.testing.assert_array_equal(weights.ratio, full.ratio)
    np.testing.assert_allclose(small.neuron_error, full.neuron_error, rtol=1e-6)
    np.testing.assert_allclose(small.error, full.error, rtol=1e-6)
    assert full.n_tokens == 8 * 10
    with pytest.raises(JfigError, match="measured on data"):
        weights.strongest("error")


def test_later_layer_and_never_cooccurring_pairs():
    """A residual feature is read by every later MLP; a pair that never fires together has NaN data metrics."""
    model = tiny_model("llama")                                   # 2 layers
    D = np.eye(16, dtype=np.float32)[:4]
    sae = jfig.SAE(W_enc=jnp.asarray(D.T), b_enc=jnp.asarray([0.0, 0.0, -1e9, 0.0]), W_dec=jnp.asarray(D),
                   b_dec=jnp.zeros(16), site="blocks.0.hook_resid_pre")
    out = neuron_interactions(model, sae, [[0, 1], [1, 2]], toy_tokens(n=4), layer=1)
    assert out.layer == 1 and out.ratio.shape == (2, model.config.d_mlp)
    assert out.cooccurrence[1] == 0 and np.isnan(out.error[1]) and np.isnan(out.expected[1]).all()
    assert np.isfinite(out.error[0])


def test_bad_input_is_refused():
    model, sae = toy_mlp_model("llama"), toy_sae()
    tiny2 = tiny_model("llama")                                   # 2 layers
    with pytest.raises(SiteError, match="residual basis"):
        neuron_interactions(tiny2, jfig.SAE(W_enc=jnp.zeros((32, 4)), b_enc=jnp.zeros(4), W_dec=jnp.zeros((4, 32)),
                                            b_dec=jnp.zeros(32), site="blocks.0.mlp.hook_post"), [[0, 1]])
    with pytest.raises(SiteError, match="no MLP reads"):
        neuron_interactions(tiny2, toy_sae("blocks.1.hook_resid_post"), [[0, 1]])
    with pytest.raises(SiteError, match="does not read"):
        neuron_interactions(tiny2, toy_sae("blocks.1.hook_resid_pre"), [[0, 1]], layer=0)
    with pytest.raises(ShapeError, match="does not match site"):
        neuron_interactions(model, toy_sae(d_model=24), [[0, 1]])
    with pytest.raises(JfigError, match="out of range"):
        neuron_interactions(model, sae, [[0, 4]])
    with pytest.raises(ShapeError, match="integer"):
        neuron_interactions(model, sae, np.array([[0.0, np.nan]]))
    with pytest.raises(ShapeError, match=r"\[n_pairs >= 1, 2\]"):
        neuron_interactions(model, sae, [0, 1, 2])
    with pytest.raises(JfigError, match="itself"):
        neuron_interactions(model, sae, [[2, 2]])
    nan_sae = jfig.SAE(W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec.at[1, 3].set(jnp.nan), b_dec=sae.b_dec,
                       site=SITE)
    with pytest.raises(JfigError, match="NaN"):
        neuron_interactions(model, nan_sae, [[0, 1]])
    wrapped = jfig.Model.from_function(lambda params, tokens, hook: tokens, {}, sites=(SITE,))
    with pytest.raises(JfigError, match="built-in model"):
        neuron_interactions(wrapped, sae, [[0, 1]])
