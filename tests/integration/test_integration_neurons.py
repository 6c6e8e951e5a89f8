"""Integration neurons: product terms over a linear fit of SAE features, streamed; the gating enrichment."""
import jax
import numpy as np
import pyarrow as pa
import pytest

import jfig
from jfig.errors import JfigError
from jfig.graph import NODE_SCHEMA
from jfig.integration import (gating_enrichment, gating_pairs, integration_from_activations, integration_neurons)
from jfig.interactions.pairs import all_pairs
from jfig.testing import tiny_model

K, F, PRODUCT_NEURON, PAIR, WEIGHT = 10, 6, 2, (3, 7), 1.5


def synthetic(n_batches=3, T=3000, seed=0):
    """Sparse skewed features [T, K]; neurons linear in them (the product neuron reads both pair features
    linearly too, and so does a strong linear neuron), plus noise; neuron 2 adds WEIGHT·f3·f7."""
    rng = np.random.default_rng(seed)
    W = np.random.default_rng(99).normal(size=(K, F))
    W[list(PAIR), 4] = 6.0                                        # a linear neuron dominated by the pair's features
    out = []
    for _ in range(n_batches):
        f = rng.exponential(1.0, (T, K)) * (rng.random((T, K)) < 0.35)
        y = f @ W + 0.2 * rng.normal(size=(T, F))
        y[:, PRODUCT_NEURON] += WEIGHT * f[:, PAIR[0]] * f[:, PAIR[1]]
        out.append((f, y))
    return out


def test_planted_product_neuron_ranked_first_by_every_criterion():
    r = integration_from_activations(synthetic(), all_pairs(np.arange(K)))
    for criterion in ("weight", "difference", "variance"):
        i, j, m, _ = r.ranked(criterion, 1)[0]
        assert (i, j, m) == (*PAIR, PRODUCT_NEURON), criterion
        s = r.score(criterion)
        second = np.sort(s.reshape(-1))[-2]
        assert r.ranked(criterion, 1)[0][3] > 5 * second, criterion
    row = int(np.flatnonzero((r.pairs == PAIR).all(1))[0])
    assert r.weight[row, PRODUCT_NEURON] == pytest.approx(WEIGHT, rel=0.03)
    assert r.p_value[row, PRODUCT_NEURON] < 1e-12
    linear = [m for m in range(F) if m != PRODUCT_NEURON]
    assert np.nanmax(r.variance[:, linear]) < 2e-3                # pure linear neurons: nothing left for a product
    assert np.nanmin(r.p_value[:, linear]) * r.p_value.size > 1e-3  # and no Bonferroni-significant product
    assert (r.r2_linear[linear] > 0.98).all() and r.r2_linear[PRODUCT_NEURON] < 0.9


def test_matches_explicit_least_squares_and_batching():
    data = synthetic(n_batches=2, T=500, seed=1)
    pairs = np.array([[3, 7], [0, 1], [2, 9]])
    r = integration_from_activations(data, pairs, ridge=0.0)
    f = np.concatenate([d[0] for d in data]).astype(np.float64)
    y = np.concatenate([d[1] for d in data]).astype(np.float64)
    X = np.c_[np.ones(len(f)), f]
    rss_lin = ((y - X @ np.linalg.lstsq(X, y, rcond=None)[0]) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    for p, (i, j) in enumerate(pairs):
        Xp = np.c_[X, f[:, i] * f[:, j]]
        beta = np.linalg.lstsq(Xp, y, rcond=None)[0]
        rss = ((y - Xp @ beta) ** 2).sum(0)
        np.testing.assert_allclose(r.weight[p], beta[-1], rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(r.variance[p], (rss_lin - rss) / ss_tot, rtol=5e-3, atol=1e-6)
        both = ((f[:, i] > 0) & (f[:, j] > 0)).sum()
        fitted_change = Xp @ beta - X @ np.linalg.lstsq(X, y, rcond=None)[0]
        np.testing.assert_allclose(r.difference[p], np.sqrt((fitted_change ** 2).sum(0) / both), rtol=5e-3,
                                   atol=1e-5)
    one = integration_from_activations([(np.concatenate([d[0] for d in data]), np.concatenate([d[1] for d in data]))],
                                       pairs, ridge=0.0)
    np.testing.assert_allclose(one.variance, r.variance, rtol=1e-4, atol=1e-9)


def test_model_path_equals_captured_activations():
    model = tiny_model("llama", n_layers=2, d_model=16, seed=1)
    sae = jfig.SAE.init_random(jax.random.key(2), 16, 20, "blocks.0.hook_resid_post")
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (12, 12))
    pairs = all_pairs(np.arange(6))
    r = integration_neurons(model, sae, tokens, pairs, batch_size=6)
    assert r.layer == 1 and r.variance.shape == (len(pairs), model.config.d_mlp)
    out = model.run(tokens, capture=(sae.site, "blocks.1.mlp.hook_post"))
    f = np.asarray(sae.encode(out.cache[sae.site]))[:, 1:].reshape(-1, 20)
    y = np.asarray(out.cache["blocks.1.mlp.hook_post"])[:, 1:].reshape(-1, model.config.d_mlp)
    ref = integration_from_activations([(f, y)], pairs)
    np.testing.assert_allclose(r.variance, ref.variance, rtol=1e-3, atol=1e-6)
    with pytest.raises(JfigError, match="not among the linear features"):
        integration_neurons(model, sae, tokens, [[0, 1]], linear_features=[0, 2, 3])
    with pytest.raises(JfigError, match="read must be one of"):
        integration_neurons(model, sae, tokens, [[0, 1]], read="gate")


def gating_graph(site, pairs):
    n = len(pairs)
    feats = sorted({int(x) for p in pairs for x in p} | {0})
    nodes = {"site": [site] * len(feats) + ["blocks.9.hook_resid_post"], "feature": feats + [0],
             "layer": [0] * len(feats) + [9], "firing_rate": [None] * (len(feats) + 1),
             "label": [None] * (len(feats) + 1), "top_contexts": [None] * (len(feats) + 1)}
    edges = {"source_site": [site] * n, "source": [int(p[0]) for p in pairs],
             "target_site": ["blocks.9.hook_resid_post"] * n, "target": [0] * n, "kind": ["gating"] * n,
             "weight": [0.5] * n, "n": [8] * n, "estimator": ["factorial"] * n, "positions": ["same"] * n,
             "source_layer": [0] * n, "target_layer": [9] * n, "modulator_site": [site] * n,
             "modulator": [int(p[1]) for p in pairs]}
    edges.update({k: [None] * n for k in ("p_value", "p_bonferroni", "q_value", "variance")})
    nodes = pa.table(nodes, schema=NODE_SCHEMA)
    return jfig.InteractionGraph.from_tables(nodes, pa.table(edges))


def test_gating_enrichment():
    site = "blocks.0.hook_resid_post"
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        f = rng.exponential(1.0, (3000, 12)) * (rng.random((3000, 12)) < 0.4)
        y = f @ rng.normal(size=(12, 5)) + 0.1 * rng.normal(size=(3000, 5))
        y[:, 0] += f[:, 1] * f[:, 4]
        y[:, 3] -= 0.8 * f[:, 6] * f[:, 9]
        batches.append((f, y))
    r = integration_from_activations(batches, all_pairs(np.arange(12)))
    graph = gating_graph(site, [(4, 1), (6, 9)])
    g = gating_pairs(graph, site)
    np.testing.assert_array_equal(g, [[1, 4], [6, 9]])
    e = gating_enrichment(r, g, top=0.05, n_perm=2000)
    assert e.overlap == 2 and e.n_integration == 3 and e.p_hypergeom < 0.01 and e.p_permutation < 0.01
    assert e.mean_rank_gating == 1.5
    e0 = gating_enrichment(r, [[0, 2], [5, 8]], top=0.05, n_perm=2000)
    assert e0.overlap == 0 and e0.p_hypergeom == 1.0 and e0.p_permutation > 0.05
    with pytest.raises(JfigError, match="none of the 1 gating pairs"):
        gating_enrichment(r, [[0, 20]])
    assert gating_pairs(graph, "blocks.3.hook_resid_post").shape == (0, 2)
