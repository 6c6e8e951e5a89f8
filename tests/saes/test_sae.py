"""The SAE pytree against an independent numpy transcription of SAELens's formulas (FORMATS.md (a))."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfig.errors import JfigError, ShapeError
from jfig.saes import SAE, fold_activation_norm_scaling_factor, fold_W_dec_norm

D_IN, D_SAE, K = 6, 20, 5
SITE = "blocks.1.hook_resid_post"


# ---------------------------------------------------------------- numpy reference (SAELens v6)


def ref_encode(p, x):
    """Returns (acts, undo) where undo(out) applies norm_out and uncentring."""
    x = x.astype(np.float64)
    undo = []
    if p["center_input"]:
        c = x.mean(-1, keepdims=True)
        x = x - c
        undo.append(lambda y, c=c: y + c)
    if p["norm"] == "layer_norm":
        mu = x.mean(-1, keepdims=True)
        xc = x - mu
        std = np.sqrt(((xc - xc.mean(-1, keepdims=True)) ** 2).sum(-1, keepdims=True) / (x.shape[-1] - 1))
        x = xc / (std + 1e-5)
        undo.insert(0, lambda y, mu=mu, std=std: y * std + mu)
    elif p["norm"] == "constant_norm_rescale":
        c = np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True)
        x = x * c
        undo.insert(0, lambda y, c=c: y / c)
    if p["apply_b_dec_to_input"]:
        x = x - p["b_dec"]
    pre = x @ p["W_enc"] + p["b_enc"]
    if p["arch"] == "relu":
        acts = np.maximum(pre, 0)
    elif p["arch"] in ("jumprelu", "batchtopk"):
        acts = np.maximum(pre, 0) * (pre > p["threshold"])
    else:
        if p["rescale"]:
            pre = pre * np.linalg.norm(p["W_dec"], axis=-1)
        acts = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=-1)[..., : p["k"]]
        np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)

    def finish(out):
        for fn in undo:
            out = fn(out)
        return out

    return acts, finish


def ref_decode(p, acts, finish):
    if p["arch"] == "topk" and p["rescale"]:
        acts = acts / np.linalg.norm(p["W_dec"], axis=-1)
    return finish(acts @ p["W_dec"] + p["b_dec"])


def make(arch="relu", norm="none", apply_b_dec=True, rescale=False, center=False, seed=0, hook_z_shape=None):
    """A random SAE with non-zero biases/thresholds, and the same parameters as float64 numpy."""
    rng = np.random.default_rng(seed)
    p = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)) / np.sqrt(D_IN),
        "W_dec": rng.normal(size=(D_SAE, D_IN)) * rng.uniform(0.3, 2.0, size=(D_SAE, 1)) / np.sqrt(D_IN),
        "b_enc": rng.normal(size=D_SAE) * 0.1,
        "b_dec": rng.normal(size=D_IN) * 0.3,
        "threshold": rng.uniform(0.0, 0.4, size=D_SAE) if arch in ("jumprelu", "batchtopk") else None,
        "arch": arch, "norm": norm, "apply_b_dec_to_input": apply_b_dec, "rescale": rescale,
        "center_input": center, "k": K if arch == "topk" else None,
    }
    p = {key: value.astype(np.float32) if isinstance(value, np.ndarray) else value for key, value in p.items()}
    sae = SAE(W_enc=p["W_enc"], b_enc=p["b_enc"], W_dec=p["W_dec"], b_dec=p["b_dec"], threshold=p["threshold"],
              site="blocks.1.attn.hook_z" if hook_z_shape else SITE, architecture=arch, k=p["k"],
              apply_b_dec_to_input=apply_b_dec, normalize_activations=norm, rescale_acts_by_decoder_norm=rescale,
              center_input=center, reshape_hook_z=hook_z_shape is not None, hook_z_shape=hook_z_shape)
    return sae, p


def inputs(seed=1, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(*shape, D_IN)) * 2 + rng.normal(size=(*shape, 1))).astype(np.float32)


ARCHS = [("relu", False), ("jumprelu", False), ("batchtopk", False), ("topk", False), ("topk", True)]
NORMS = ["none", "constant_norm_rescale", "layer_norm"]


@pytest.mark.parametrize("arch,rescale", ARCHS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("center", [False, True])
def test_matches_numpy_reference(arch, rescale, norm, apply_b_dec, center):
    sae, p = make(arch, norm, apply_b_dec, rescale, center)
    x = inputs()
    acts, finish = ref_encode(p, x)
    f, stats = sae.encode_with_stats(x)
    assert f.shape == (3, 4, D_SAE)
    np.testing.assert_allclose(f, acts, atol=2e-5, rtol=1e-4)
    assert (np.asarray(f) > 0).sum() > 0
    if arch == "topk":
        assert ((np.asarray(f) != 0).sum(-1) <= K).all()
    np.testing.assert_allclose(sae.decode(f, stats), ref_decode(p, acts, finish), atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(sae.reconstruct(x), ref_decode(p, acts, finish), atol=5e-5, rtol=1e-4)


def test_layer_norm_std_is_torch_unbiased_std():
    torch = pytest.importorskip("torch")
    sae, _ = make(norm="layer_norm")
    x = inputs()
    _, stats = sae.normalize(x)
    want = torch.from_numpy(x).std(dim=-1, keepdim=True).numpy()  # torch default: unbiased
    np.testing.assert_allclose(stats["std"], want, rtol=1e-5)
    assert stats["std"].shape == (3, 4, 1)


def test_no_stats_needed_without_normalisation():
    sae, _ = make()
    assert sae.normalize(inputs())[1] is None and not sae.needs_stats


@pytest.mark.parametrize("norm,center", [("layer_norm", False), ("constant_norm_rescale", False), ("none", True)])
def test_decode_without_stats_raises(norm, center):
    sae, _ = make(norm=norm, center=center)
    f = sae.encode(inputs())
    with pytest.raises(JfigError, match="needs the stats from encode_with_stats"):
        sae.decode(f)


# ---------------------------------------------------------------- properties

configs = st.tuples(st.sampled_from(ARCHS), st.sampled_from(NORMS), st.booleans(), st.booleans(),
                    st.integers(0, 2**16))


@settings(max_examples=30, deadline=None)
@given(configs, st.floats(0.01, 100.0))
def test_reconstruct_plus_error_is_input(config, scale):
    (arch, rescale), norm, apply_b_dec, center, seed = config
    sae, _ = make(arch, norm, apply_b_dec, rescale, center, seed=seed)
    x = inputs(seed + 1) * np.float32(scale)
    recon = sae.reconstruct(x)
    tol = 1e-6 * (np.abs(x).max() + np.abs(recon).max())  # float32 rounding of the sum
    np.testing.assert_allclose(recon + sae.error(x), x, rtol=0, atol=tol)


@settings(max_examples=30, deadline=None)
@given(configs, st.integers(0, D_SAE - 1), st.floats(0.1, 3.0))
def test_decode_direction_is_the_decode_derivative(config, feature, delta):
    (arch, rescale), norm, apply_b_dec, center, seed = config
    sae, _ = make(arch, norm, apply_b_dec, rescale, center, seed=seed)
    f, stats = sae.encode_with_stats(inputs(seed + 1))
    bumped = f.at[..., feature].add(delta)
    finite = (sae.decode(bumped, stats) - sae.decode(f, stats)) / delta
    direction = sae.decode_direction(feature, stats)
    np.testing.assert_allclose(jnp.broadcast_to(direction, finite.shape), finite, atol=1e-4, rtol=1e-3)


def test_decode_direction_traced_feature_and_clamp():
    sae, _ = make("jumprelu", "layer_norm", center=True)
    x = inputs()
    f, stats = sae.encode_with_stats(x)
    dirs = jax.jit(jax.vmap(sae.decode_direction, in_axes=(0, None)))(jnp.arange(3), stats)
    assert dirs.shape == (3, 3, 4, D_IN)
    np.testing.assert_allclose(dirs[2], sae.decode_direction(2, stats), rtol=1e-6)
    # error-preserving clamp: x' = x + (v - f_i) d_i equals decode(f with f_i = v) + error(x)
    value = 1.5
    clamped = x + (value - f[..., 2:3]) * sae.decode_direction(2, stats)
    want = sae.decode(f.at[..., 2].set(value), stats) + sae.error(x)
    np.testing.assert_allclose(clamped, want, atol=1e-5)


# ---------------------------------------------------------------- folding


@pytest.mark.parametrize("arch,rescale", [("relu", False), ("jumprelu", False), ("batchtopk", False), ("topk", True)])
@pytest.mark.parametrize("norm", ["none", "layer_norm"])
def test_fold_W_dec_norm_keeps_the_function(arch, rescale, norm):
    sae, _ = make(arch, norm, rescale=rescale)
    folded = fold_W_dec_norm(sae)
    x = inputs()
    np.testing.assert_allclose(jnp.linalg.norm(folded.W_dec, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(folded.reconstruct(x), sae.reconstruct(x), atol=2e-5, rtol=1e-4)
    n = np.linalg.norm(np.asarray(sae.W_dec), axis=-1)
    scale = 1.0 if rescale else n  # topk with rescaling already reports f in unit-decoder units
    np.testing.assert_allclose(folded.encode(x), sae.encode(x) * scale, atol=2e-5, rtol=1e-4)
    assert sae.fold_W_dec_norm().site == sae.site


def test_fold_W_dec_norm_refuses_plain_topk():
    sae, _ = make("topk")
    with pytest.raises(JfigError, match="rescale_acts_by_decoder_norm"):
        sae.fold_W_dec_norm()


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_fold_activation_norm_scaling_factor(arch):
    sae, _ = make(arch, apply_b_dec=True)
    s = 0.37
    folded = fold_activation_norm_scaling_factor(sae, s)
    x = inputs()
    np.testing.assert_allclose(folded.encode(x), sae.encode(x * s), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(folded.reconstruct(x), sae.reconstruct(x * s) / s, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- pytree, jit, vmap, shapes


def test_pytree_leaves_are_the_arrays():
    sae, _ = make("jumprelu")
    leaves = jax.tree_util.tree_leaves(sae)
    assert len(leaves) == 5 and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert len(jax.tree_util.tree_leaves(make("relu")[0])) == 4
    hash(sae.metadata)


def test_jit_and_vmap():
    sae, _ = make("topk", "layer_norm", rescale=True)
    x = inputs(shape=(5, 3))
    eager = sae.encode(x)
    np.testing.assert_allclose(jax.jit(SAE.encode)(sae, x), eager, atol=1e-6)
    np.testing.assert_allclose(eqx.filter_jit(sae.encode)(x), eager, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(sae.encode)(x), eager, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.vmap(sae.reconstruct))(x), sae.reconstruct(x), atol=1e-6)
    np.testing.assert_allclose(sae.encode(x[0, 0]), eager[0, 0], atol=1e-6)  # no batch dims


def test_jit_does_not_retrace_for_new_weights():
    traces = []

    @jax.jit
    def run(sae, x):
        traces.append(None)
        return sae.reconstruct(x)

    x = inputs()
    for seed in range(3):
        run(make("jumprelu", seed=seed)[0], x)
    assert len(traces) == 1


def test_hook_z_input_is_flattened_and_restored():
    sae, _ = make("relu", hook_z_shape=(2, 3))
    flat, _ = make("relu")
    x = inputs(shape=(4,)).reshape(4, 2, 3)
    np.testing.assert_allclose(sae.encode(x), flat.encode(x.reshape(4, 6)), atol=1e-6)
    assert sae.reconstruct(x).shape == (4, 2, 3)
    assert sae.decode_direction(1).shape == (2, 3)
    with pytest.raises(ShapeError, match="n_heads, d_head"):
        sae.encode(x.reshape(4, 6))


def test_wrong_input_width_is_named():
    sae, _ = make()
    with pytest.raises(ShapeError, match=r"d_in=6.*\(3, 5\)"):
        sae.encode(jnp.ones((3, 5)))


def test_validation_names_the_tensor():
    sae, p = make("jumprelu")
    with pytest.raises(ShapeError, match=r"W_dec has shape \(6, 20\); expected \[20, 6\]"):
        dataclasses.replace(sae, W_dec=p["W_dec"].T)
    with pytest.raises(ShapeError, match="needs a threshold"):
        dataclasses.replace(sae, threshold=None)
    with pytest.raises(JfigError, match="int k"):
        make("topk")[0].__class__(**{**{f.name: getattr(sae, f.name) for f in dataclasses.fields(sae)},
                                     "architecture": "topk", "threshold": None, "k": None})
    with pytest.raises(JfigError, match="architecture 'gated'"):
        dataclasses.replace(sae, architecture="gated")


def test_init_random():
    for arch, k in [("relu", None), ("jumprelu", None), ("topk", 4)]:
        sae = SAE.init_random(jax.random.key(0), 8, 32, SITE, arch, k=k)
        assert (sae.d_in, sae.d_sae, sae.architecture) == (8, 32, arch)
        np.testing.assert_allclose(jnp.linalg.norm(sae.W_dec, axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(sae.W_enc, sae.W_dec.T)
        assert sae.encode(jnp.ones(8)).shape == (32,)
    assert SAE.init_random(jax.random.key(0), 4, 8, SITE, dtype=jnp.bfloat16).W_enc.dtype == jnp.bfloat16
