"""observe_cascade and compare_cascade on a planted model whose cascade the graph predicts exactly.

The planted model (Model.from_function, identity ReLU SAEs, D = 8 features per site):
  x0 = sources (features 0..5 token-dependent in [1, 2]; A = 6 and M = 7 constant 1.0 and 1.5)
  t1 = relu(b1 + x0 @ W1)                 b1 = 3, except feature K = 7 with bias 0.5 (it can be clipped)
  t2 = relu(8 + t1 @ W2 + G x0[A] x0[M] e_J)
Every feature but K stays active under the clamps used here, so the network is linear where it runs,
and K's clipping is exactly the activation bound −baseline of the cascade.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.edits import Clamp
from jfig.errors import JfigError, ShapeError, SiteError
from jfig.steering import cascade_nodes, compare_cascade, observe_cascade, predict_cascade
from tests.support.graphs import graph_from_edges
from tests.steering.test_cascade import set_gating_weights

D = 8
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
S0, S1, S2 = SITES
A, M, K, J, G = 6, 7, 7, 3, 0.8
SOURCE_A, SOURCE_M = 1.0, 1.5
W1 = {(0, 0): 1.0, (0, 1): 0.8, (0, 2): -0.6, (1, 3): 0.5, (2, 4): -0.7, (3, 5): 0.9, (A, 6): 0.5, (0, K): -0.3,
      (4, K): 0.5}
W2 = {(0, 0): 1.0, (0, 1): 0.7, (1, 2): -0.8, (1, 3): 0.6, (2, 4): 0.5, (3, 5): -0.4, (K, 6): 1.2, (6, 7): 0.5,
      (4, 6): 0.3}
SOURCES = [(S0, 0), (S0, A), (S0, M)]
SOURCE_VALUES = [4.0, 3.0, 1.0]            # clamped values: changes 4 − x0[0] (per token), 2.0 and −0.5


def dense(weights):
    w = np.zeros((D, D), np.float32)
    for (i, j), v in weights.items():
        w[i, j] = v
    return w


def identity_sae(site):
    eye = jnp.eye(D)
    return jfig.SAE(W_enc=eye, b_enc=jnp.zeros(D), W_dec=eye, b_dec=jnp.zeros(D), threshold=None, site=site,
                    architecture="relu", apply_b_dec_to_input=False)


def linear_model(vocab=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(1.0, 2.0, (vocab, D)).astype(np.float32)
    x[:, A], x[:, M] = SOURCE_A, SOURCE_M
    b1 = np.full(D, 3.0, np.float32)
    b1[K] = 0.5
    params = {"X": jnp.asarray(x), "W1": jnp.asarray(dense(W1)), "W2": jnp.asarray(dense(W2)), "b1": jnp.asarray(b1),
              "U": jax.random.normal(jax.random.PRNGKey(seed), (D, vocab))}

    def apply(p, tokens, hook):
        x0 = hook(S0, p["X"][tokens])
        t1 = hook(S1, jax.nn.relu(p["b1"] + x0 @ p["W1"]))
        t2 = (8.0 + t1 @ p["W2"]).at[..., J].add(G * x0[..., A] * x0[..., M])
        return hook(S2, jax.nn.relu(t2)) @ p["U"]

    model = jfig.Model.from_function(apply, params, sites=SITES, vocab_size=vocab, site_widths=dict.fromkeys(SITES, D))
    return model, [identity_sae(s) for s in SITES]


def true_graph():
    """The planted weights as a graph: W1, W2, the gate (A, M -> J) with weight G and the gate inputs'
    first-order slopes at the operating point (G x_M for A, G x_A for M)."""
    rows = [(0, i, 1, j, w) for (i, j), w in W1.items()] + [(1, i, 2, j, w) for (i, j), w in W2.items()]
    rows += [(0, A, 2, J, G * SOURCE_M), (0, M, 2, J, G * SOURCE_A)]
    a, i, b, j, w = map(np.asarray, zip(*rows))
    graph = graph_from_edges(SITES, a, i, b, j, np.sign(w), np.abs(w), n_features=D, gating=[(0, M, 0, A, 2, J)])
    return set_gating_weights(graph, [G])


def source_clamp(sae):
    return Clamp(sae, np.array([f for _, f in SOURCES]), np.array(SOURCE_VALUES, np.float32))


TOKENS = np.random.default_rng(1).integers(0, 32, size=(4, 8))


@pytest.fixture(scope="module")
def planted():
    model, saes = linear_model()
    observed = observe_cascade(model, saes, source_clamp(saes[0]), TOKENS)
    return model, saes, observed


def max_error(predicted, observed):
    keys = set(predicted) | set(observed)
    return max(float(np.max(np.abs(np.asarray(predicted.get(k, 0.0)) - observed.get(k, 0.0)))) for k in keys)


def test_observed_changes_are_edited_minus_clean(planted):
    model, saes, observed = planted
    assert set(observed.changes) == set(SITES) and observed.mask.all()
    for site in SITES:
        assert observed.changes[site].shape == observed.clean[site].shape == (4, 8, D)
    x0 = observed.clean[S0]
    np.testing.assert_allclose(observed.at(S0, 0), 4.0 - x0[..., 0], atol=1e-6)
    np.testing.assert_allclose(observed.at(S1, 1), 0.8 * (4.0 - x0[..., 0]), atol=1e-5)
    assert not observed.at(S0, 1).any() and not observed.at(S1, 4).any()      # untouched paths: exactly 0
    assert (observed.clean[S1][..., K] > 0).all()                              # K is active before the clamp
    clipped = observed.clean[S1][..., K] + observed.at(S1, K) == 0
    assert 0 < clipped.sum() < clipped.size                                    # and clipped on some tokens only
    for site in (S1, S2):                                                      # every other target stays active
        edited = observed.clean[site] + observed.changes[site]
        assert (np.delete(edited, K, axis=-1) > 0).all() if site == S1 else (edited > 0).all()


def test_prediction_equals_observation_and_needs_hops_gating_and_bounds(planted):
    _, _, observed = planted
    tokens = observed.token_changes()
    deltas = {k: tokens[k] for k in SOURCES}
    graph = true_graph()
    baseline = observed.clean_values(cascade_nodes(graph))
    predicted = predict_cascade(graph, deltas, baseline=baseline, compose="all")
    assert max_error(predicted, tokens) < 1e-5
    assert max_error(predict_cascade(graph, deltas, baseline=baseline, hops=1, compose="all"), tokens) > 0.5
    assert max_error(predict_cascade(graph, deltas, baseline=baseline, gating=False, compose="all"), tokens) == \
        pytest.approx(G * 2.0 * 0.5, abs=1e-4)                                  # the ΔA·ΔM term alone
    assert max_error(predict_cascade(graph, deltas, compose="all"), tokens) > 0.05              # K's clipping

    fit = compare_cascade(predicted, tokens, exclude=SOURCES)
    assert fit.r2 > 1 - 1e-8 and fit.r2_linear > 1 - 1e-8 and fit.spearman > 0.999
    assert fit.n == (len(set(predicted) | set(tokens)) - len(SOURCES)) * TOKENS.size
    keys = [k for k in predicted if k not in SOURCES]
    values = np.stack([predicted[k] for k in keys]).ravel()
    shuffled = np.random.default_rng(0).permutation(values).reshape(len(keys), -1)
    assert compare_cascade(dict(zip(keys, shuffled)), tokens, exclude=SOURCES).r2 < 0.5


def test_means_masks_and_positions(planted):
    model, saes, observed = planted
    mask = np.zeros((4, 8), bool)
    mask[1, 2:5] = True
    means = observed.mean_changes(mask)
    assert means[(S1, 0)] == pytest.approx(float(observed.at(S1, 0)[1, 2:5].mean()), abs=1e-6)
    assert (S1, 4) not in means and (S0, 1) not in means
    assert observed.mean_changes() == pytest.approx({k: float(v.mean()) for k, v in observed.token_changes().items()})
    at_end = observe_cascade(model, saes, source_clamp(saes[0]), TOKENS, positions=[-1])
    assert at_end.mask[:, -1].all() and at_end.mask.sum() == 4
    assert len(at_end.token_changes()[(S0, 0)]) == 4
    assert at_end.clean_values([(S1, 0), (S0, 0)]).shape == (4, 2)
    np.testing.assert_allclose(at_end.clean_values([(S0, 0)])[:, 0], observed.clean[S0][:, -1, 0])


def test_compare_cascade_keys_and_shapes():
    fit = compare_cascade({("s", 0): 1.0, ("s", 1): 2.0}, {("s", 0): 1.0, ("s", 1): 2.0, ("s", 2): 0.5})
    assert fit.n == 3 and fit.r2 < 1                       # the missing prediction counts as 0
    only = compare_cascade({("s", 0): 1.0, ("s", 1): 2.0}, {("s", 0): 1.0, ("s", 1): 2.0, ("s", 2): 0.5},
                           features=[("s", 0), ("s", 1)])
    assert only.n == 2 and only.r2 == pytest.approx(1.0)
    with pytest.raises(ShapeError, match=r"\('s', 0\)"):
        compare_cascade({("s", 0): np.ones(3)}, {("s", 0): np.ones(2)})
    assert np.isnan(compare_cascade({("s", 0): 1.0}, {("s", 0): 1.0}).r2)


def test_bad_observation_queries(planted):
    model, saes, observed = planted
    with pytest.raises(SiteError, match="blocks.5"):
        observed.at("blocks.5.hook_resid_post", 0)
    with pytest.raises(JfigError, match="feature 8"):
        observed.at(S0, 8)
    with pytest.raises(ShapeError, match="mask"):
        observed.mean_changes(np.ones((3, 8), bool))
    with pytest.raises(ShapeError, match="out of range"):
        observe_cascade(model, saes, source_clamp(saes[0]), TOKENS, positions=[8])
