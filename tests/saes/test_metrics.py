"""SAE metrics against direct numpy computations: fvu, L0, dead/dense fractions and downstream CE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.edits import Patch
from jfig.errors import JfigError, ShapeError
from jfig.models.config import llama_config
from jfig.models.forward import init_params
from jfig.saes import SAE
from jfig.saes.metrics import Splice, activation_metrics, sae_metrics

SITE = "blocks.1.hook_resid_post"
D_MODEL, VOCAB = 16, 50


def tiny_model():
    cfg = llama_config(n_layers=3, d_model=D_MODEL, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=VOCAB,
                       max_seq_len=32)
    return jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def planted_sae(architecture, d_in=8, d_sae=24, seed=0, k=None):
    """A random SAE whose first three latents never fire and last two fire on every token."""
    sae = SAE.init_random(jax.random.key(seed), d_in, d_sae, SITE, architecture, k)
    b_enc = np.asarray(jax.random.normal(jax.random.key(seed + 1), (d_sae,))) * 0.3
    b_enc[:3], b_enc[-2:] = -1e3, 1e3
    threshold = None if architecture != "jumprelu" else jnp.full((d_sae,), 0.2)
    return dataclasses.replace(sae, b_enc=jnp.asarray(b_enc, jnp.float32), threshold=threshold,
                               b_dec=jax.random.normal(jax.random.key(seed + 2), (d_in,)) * 0.1)


def numpy_metrics(sae, x):
    x = np.asarray(x, np.float64).reshape(-1, sae.d_in)
    W_enc, b_enc, W_dec, b_dec = (np.asarray(a, np.float64) for a in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    if sae.architecture == "relu":
        f = np.maximum(pre, 0)
    elif sae.architecture == "jumprelu":
        f = np.where(pre > np.asarray(sae.threshold), np.maximum(pre, 0), 0)
    else:
        kth = np.sort(pre, axis=-1)[:, -sae.k][:, None]
        f = np.where(pre >= kth, np.maximum(pre, 0), 0)
    x_hat = f @ W_dec + b_dec
    fvu = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    active = f != 0
    freq = active.mean(0)
    return {"fvu": fvu, "explained_variance": 1 - fvu, "mse": np.mean(np.sum((x - x_hat) ** 2, -1)),
            "l0": active.sum(-1).mean(), "dead_fraction": np.mean(freq == 0), "dense_fraction": np.mean(freq > 0.1)}


@pytest.mark.parametrize("architecture,k", [("relu", None), ("jumprelu", None), ("topk", 5)])
@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_activation_metrics_match_numpy(architecture, k, chunk_size):
    sae = planted_sae(architecture, k=k)
    x = jax.random.normal(jax.random.key(5), (3, 20, 8)) + 2.0  # an offset mean, as residual streams have
    got = activation_metrics(sae, x, chunk_size=chunk_size)
    want = numpy_metrics(sae, x)
    assert got["n_tokens"] == 60
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    if architecture != "topk":
        assert got["dead_fraction"] >= 3 / 24 and got["dense_fraction"] >= 2 / 24


def test_dead_and_dense_counts_exact():
    sae = planted_sae("relu")
    # b_enc = +-1e3 decides the first three (never) and last two (always) latents outright.
    m = activation_metrics(sae, jnp.zeros((10, 8)).at[:, 0].set(jnp.arange(10.0)))
    f = np.asarray(sae.encode(jnp.zeros((10, 8)).at[:, 0].set(jnp.arange(10.0))))
    assert m["dead_fraction"] == np.mean((f != 0).sum(0) == 0)
    assert m["dense_fraction"] == np.mean((f != 0).mean(0) > 0.1)


def test_hook_z_sae_takes_heads():
    sae = dataclasses.replace(planted_sae("relu"), reshape_hook_z=True, hook_z_shape=(2, 4))
    x = jax.random.normal(jax.random.key(1), (4, 6, 2, 4))
    got = activation_metrics(sae, x)
    want = numpy_metrics(dataclasses.replace(sae, reshape_hook_z=False, hook_z_shape=None), x)
    np.testing.assert_allclose(got["fvu"], want["fvu"], rtol=2e-5)
    np.testing.assert_allclose(got["l0"], want["l0"], rtol=1e-6)


def test_activation_metrics_errors():
    sae = planted_sae("relu")
    with pytest.raises(ShapeError, match="d_in=8"):
        activation_metrics(sae, jnp.ones((4, 9)))
    with pytest.raises(JfigError, match="NaN"):
        activation_metrics(sae, jnp.ones((4, 8)).at[1, 2].set(jnp.nan))
    with pytest.raises(ShapeError, match="floating"):
        activation_metrics(sae, jnp.ones((4, 8), jnp.int32))


# ---------------------------------------------------------------------------------- downstream CE


def numpy_ce(logits, tokens):
    logits = np.asarray(logits, np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1).mean()


@pytest.mark.parametrize("exclude_first", [True, False])
def test_sae_metrics_match_numpy(model, exclude_first):
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(5, 9))
    sae = SAE.init_random(jax.random.key(3), D_MODEL, 40, SITE, "topk", 6)
    sae = dataclasses.replace(sae, b_dec=jnp.full((D_MODEL,), 0.05))
    got = sae_metrics(model, sae, tokens, batch_size=2, exclude_first=exclude_first)

    clean = model.run(tokens, capture=(SITE,))
    acts = np.asarray(clean.cache[SITE])
    recon = np.array(sae.reconstruct(jnp.asarray(acts)))
    zeros = np.zeros_like(acts)
    if exclude_first:
        recon[:, 0], zeros[:, 0] = acts[:, 0], acts[:, 0]
    spliced = model.run(tokens, edits=(Patch(SITE, recon),)).logits
    zeroed = model.run(tokens, edits=(Patch(SITE, zeros),)).logits
    want = {"ce_clean": numpy_ce(clean.logits, tokens), "ce_spliced": numpy_ce(spliced, tokens),
            "ce_zero": numpy_ce(zeroed, tokens)}
    want["ce_loss_recovered"] = (want["ce_zero"] - want["ce_spliced"]) / (want["ce_zero"] - want["ce_clean"])
    for key, value in want.items():  # the ratio amplifies float32 rounding of the CE differences
        np.testing.assert_allclose(got[key], value, rtol=1e-4 if key == "ce_loss_recovered" else 1e-5, err_msg=key)
    measured = acts[:, 1:] if exclude_first else acts
    for key, value in numpy_metrics(sae, measured).items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    assert got["n_tokens"] == measured.shape[0] * measured.shape[1]


def test_perfect_sae_recovers_all_loss(model):
    # relu(x) - relu(-x) = x: a relu SAE with latents +-e_i reconstructs exactly.
    eye = jnp.eye(D_MODEL)
    sae = SAE(W_enc=jnp.concatenate([eye, -eye], 1), b_enc=jnp.zeros(2 * D_MODEL),
              W_dec=jnp.concatenate([eye, -eye], 0), b_dec=jnp.zeros(D_MODEL), site=SITE)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(3, 6))
    m = sae_metrics(model, sae, tokens)
    np.testing.assert_allclose(m["ce_spliced"], m["ce_clean"], rtol=1e-5)
    np.testing.assert_allclose(m["ce_loss_recovered"], 1.0, atol=1e-4)
    assert m["fvu"] < 1e-10


def test_splice_edit_equals_patch_of_reconstruction(model):
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(2, 7))
    sae = SAE.init_random(jax.random.key(4), D_MODEL, 32, SITE)
    acts = model.run(tokens, capture=(SITE,)).cache[SITE]
    a = model.run(tokens, edits=(Splice(sae),)).logits
    b = model.run(tokens, edits=(Patch(SITE, sae.reconstruct(acts)),)).logits
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_sae_metrics_errors(model):
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(ShapeError, match="does not match site"):
        sae_metrics(model, SAE.init_random(jax.random.key(0), 12, 20, SITE), tokens)
    sae = SAE.init_random(jax.random.key(0), D_MODEL, 20, SITE)
    with pytest.raises(ShapeError, match="at least 2"):
        sae_metrics(model, sae, tokens[:, :1])
    with pytest.raises(ShapeError, match="int"):
        sae_metrics(model, sae, tokens.astype(np.float32))
    with pytest.raises(jfig.SiteError):
        sae_metrics(model, dataclasses.replace(sae, site="blocks.9.hook_resid_post"), tokens)
