"""Every metric on a tiny random model of each family with random SAEs: outputs are finite where
defined and have the documented shapes. (The example of docs/interactions.md runs the same metrics
fed by an atlas.)"""
import numpy as np
import pytest

from jfig.interactions import (all_pairs, dominance_test, feature_distribution, neuron_interactions, qk_terms,
                               query_overlap)
from jfig.testing import tiny_model
from tests.interactions.toys import random_sae, toy_tokens

SITE, LATER = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_every_metric_on_a_tiny_model(family):
    model = tiny_model(family)                      # 2 layers, d_model 16, 4 heads of 4, d_mlp 32
    cfg = model.config
    saes = [random_sae(1, 16, 24, SITE, bias=-0.3), random_sae(2, 16, 20, LATER, bias=-0.3)]
    tokens = toy_tokens(n=16, seq=12, seed=4)
    pairs = all_pairs([0, 3, 7, 12])[:5]                                      # [5, 2]
    neurons = neuron_interactions(model, saes[0], pairs, tokens, skip_positions=1)
    assert neurons.layer == 1 and neurons.mlp == cfg.mlp
    for name, shape in dict(ratio=(5, cfg.d_mlp), expected=(5, cfg.d_mlp), neuron_error=(5, cfg.d_mlp),
                            hadamard=(5,), error=(5,), cooccurrence=(5,)).items():
        value = getattr(neurons, name)
        assert value.shape == shape and np.isfinite(value).all(), name
    assert (neurons.cooccurrence > 0).all() and (neurons.error > 0).all()
    assert (np.abs(neurons.ratio) <= 1 + 1e-6).all()

    terms = qk_terms(model, saes[0], [0, 5, 7], [1, 2], offsets=[0, 3])
    assert terms.layer == 1 and terms.score.shape == terms.interaction.shape == (2, cfg.n_heads, 3, 2)
    overlap = query_overlap(model, saes[0], [0, 5, 7, 9])
    assert overlap.overlap.shape == (1, cfg.n_heads, 4, 4) and (np.abs(overlap.overlap) <= 1 + 1e-5).all()
    dom = dominance_test(model, saes[0], tokens, skip_positions=1)
    assert dom.n_queries > 0
    for value in (dom.tv_dominant, dom.tv_none, dom.same_top_key, dom.explained):
        assert value.shape == (cfg.n_heads,) and np.isfinite(value).all()
    assert ((dom.tv_dominant >= 0) & (dom.tv_dominant <= 1)).all()

    feats = {SITE: range(10), LATER: [0, 4, 8]}
    edges = {SITE: np.tile([0.1, 0.3, 0.6], (10, 1)), LATER: np.tile([0.2, 0.4, 0.8], (3, 1))}
    dist = feature_distribution(model, saes, tokens, feats, bins=5, edges=edges, skip_positions=1)
    assert dist.edges.shape == (13, 3) and dist.n_tokens == 16 * 11
    for name in ("cov", "corr", "mi", "mi_corrected", "df"):
        assert getattr(dist, name).shape == (13, 13) and np.isfinite(getattr(dist, name)).all(), name
    off = ~np.eye(13, dtype=bool)
    assert ((dist.p_value[off] >= 0) & (dist.p_value[off] <= 1)).all()
