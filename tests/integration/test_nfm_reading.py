"""Reading an NFM: the Gini coefficient, dimension strength and partners on hand-built embeddings, the
contexts against a brute-force ranking, and interaction ablation against nfm_metrics' linear-only splice."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfig.errors import JfigError
from jfig.integration.nfm_reading import (ablate_interaction, dimension_strength, gini, interaction_contexts,
                                          read_dimensions)
from jfig.saes import NFM, SAE, nfm_metrics
from jfig.testing import tiny_model

SITE = "blocks.1.hook_resid_post"


def test_gini_against_the_mean_absolute_difference():
    assert gini([2.0, 2.0, 2.0, 2.0]) == pytest.approx(0.0)
    assert gini([0.0, 0.0, 0.0, -5.0]) == pytest.approx(0.75)      # one holds all: 1 - 1/n
    rng = np.random.default_rng(0)
    v = np.abs(rng.normal(size=13))
    explicit = sum(abs(a - b) for a, b in itertools.product(v, v)) / (2 * len(v) ** 2 * v.mean())
    assert gini(-v) == pytest.approx(explicit, rel=1e-12)
    assert np.isnan(gini(np.zeros(4)))


def hand_nfm(hidden=0):
    """Dimension 0 pairs features 3 and 7 (large), dimension 1 spreads over 1, 2, 5; dimension 2 is weak."""
    V = np.full((10, 3), 0.01)
    V[3, 0], V[7, 0] = 1.0, -0.8
    V[[1, 2, 5], 1] = [0.5, 0.45, 0.4]
    V[4, 2] = 0.2
    W_out = np.ones((3, 6))
    return NFM(W_lin=np.zeros((10, 6)), b=np.zeros(6), V=V, W_out=W_out, site=SITE)


def test_read_dimensions_names_the_pairs():
    nfm = hand_nfm()
    readings = read_dimensions(nfm, top=3, partners=2)
    assert [r.k for r in readings] == [0, 1, 2]                     # strongest first
    first = readings[0]
    assert [i for i, _ in first.top[:2]] == [3, 7]
    assert first.partners[3][0] == (7, pytest.approx(-0.8))         # V[3,0] * V[7,0]
    assert first.gini > readings[1].gini
    assert [i for i, _ in readings[1].top] == [1, 2, 5]
    only = read_dimensions(nfm, dims=[2], top=1, partners=1)
    assert len(only) == 1 and only[0].top[0][0] == 4
    with pytest.raises(JfigError, match="out of range"):
        read_dimensions(nfm, dims=[3])


def test_dimension_strength_is_invariant_to_rescaling():
    nfm = hand_nfm()
    c = np.array([2.0, 0.5, 3.0])
    scaled = NFM(W_lin=nfm.W_lin, b=nfm.b, V=nfm.V * c, W_out=nfm.W_out / (c ** 2)[:, None], site=SITE)
    f = jnp.asarray(np.random.default_rng(1).uniform(size=(5, 10)), jnp.float32)
    np.testing.assert_allclose(scaled(f), nfm(f), rtol=1e-5)          # the same function
    np.testing.assert_allclose(dimension_strength(scaled), dimension_strength(nfm), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", n_layers=2, d_model=16)
    sae = SAE.init_random(jax.random.key(3), 16, 12, SITE, architecture="topk", k=4)
    V = jax.random.normal(jax.random.key(1), (12, 3))
    W_out = jnp.zeros((3, 16)).at[0].set(0.0).at[1:].set(jax.random.normal(jax.random.key(2), (2, 16)))
    nfm = NFM(W_lin=0.02 * jax.random.normal(jax.random.key(5), (12, 16)), b=jnp.zeros(16), V=V, W_out=W_out, site=SITE)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (6, 10), 1, 64), np.int32)
    return model, sae, nfm, tokens


def test_contexts_are_the_largest_scores(tiny):
    model, sae, nfm, tokens = tiny
    found = interaction_contexts(model, sae, nfm, tokens, top=4, window=3, batch_size=4)["interaction"]
    x = model.run(jnp.asarray(tokens), capture=(SITE,), stop_at=SITE, logits=False).cache[SITE]
    score = np.asarray(jnp.linalg.norm(nfm.interaction(sae.encode(x)), axis=-1))[:, 1:]   # position 0 left out
    best = np.argsort(-score, axis=None)[:4]
    want = [(int(r), int(p) + 1) for r, p in zip(*np.unravel_index(best, score.shape))]
    assert [(c.sequence, c.position) for c in found] == want
    np.testing.assert_allclose([c.score for c in found], np.sort(score, axis=None)[::-1][:4], rtol=1e-5)
    c = found[0]
    assert c.tokens == tokens[c.sequence, c.position - 2:c.position + 1].tolist()
    per_dim = interaction_contexts(model, sae, nfm, tokens, dims=[1, 2], top=2)
    assert set(per_dim) == {1, 2} and all(len(v) == 2 for v in per_dim.values())
    with pytest.raises(JfigError, match="K=3"):
        interaction_contexts(model, sae, nfm, tokens, dims=[5])


def test_ablation_matches_the_linear_splice_and_silent_dimensions(tiny):
    model, sae, nfm, tokens = tiny
    whole = ablate_interaction(model, sae, nfm, tokens)
    metrics = nfm_metrics(model, sae, nfm, tokens)
    assert whole["ce_ablated"] == pytest.approx(metrics["ce_nfm_linear"], abs=1e-5)
    assert whole["ce_nfm"] == pytest.approx(metrics["ce_nfm"], abs=1e-5)
    assert whole["kl_nfm_ablated"] > 1e-5
    silent = ablate_interaction(model, sae, nfm, tokens, dims=[0])   # W_out[0] = 0: dimension 0 writes nothing
    assert silent["kl_nfm_ablated"] == pytest.approx(0.0, abs=1e-7)
    assert ablate_interaction(model, sae, nfm, tokens, dims=[1])["kl_nfm_ablated"] > 1e-6
    with pytest.raises(JfigError, match="dims"):
        ablate_interaction(model, sae, nfm, tokens, dims=[])
