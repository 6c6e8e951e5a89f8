"""Parity with HF transformers on tiny random configs of every family."""
import jax.numpy as jnp
import numpy as np
import pytest

from jfig.models.hf_loader import config_from_hf, params_from_hf_state_dict
from jfig.models.model import Model

from tests.support.hf_reference import hf_forward, state_dict_numpy, tiny_hf

CASES = [
    ("llama", 4, 4), ("llama", 4, 2), ("llama", 4, 1),
    ("gemma2", 4, 4), ("gemma2", 4, 2), ("gemma2", 4, 1),
    ("gpt2", 4, 4),
]


def _jfig(model_hf, cfg_dict):
    cfg = config_from_hf(cfg_dict)
    params = params_from_hf_state_dict(cfg, state_dict_numpy(model_hf))
    return Model.from_config(cfg, params)


@pytest.mark.parametrize("family,n_heads,n_kv", CASES)
def test_logits_and_sites_match_hf(family, n_heads, n_kv):
    model_hf, cfg_dict = tiny_hf(family, n_heads=n_heads, n_kv_heads=n_kv)
    model = _jfig(model_hf, cfg_dict)
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 11))
    ref_logits, ref_hidden = hf_forward(model_hf, tokens)
    L = model.config.n_layers
    sites = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(L - 1)]
    out = model.run(jnp.asarray(tokens), capture=sites)
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-5, rtol=0)
    for i, site in enumerate(sites):
        np.testing.assert_allclose(np.asarray(out.cache[site]), ref_hidden[i], atol=1e-5, rtol=0, err_msg=site)


def test_llama3_rope_scaling_matches_hf():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    model_hf, cfg_dict = tiny_hf("llama", n_heads=4, n_kv_heads=2, rope_scaling=scaling, rope_theta=500000.0)
    model = _jfig(model_hf, cfg_dict)
    assert model.config.rope_scaling is not None
    tokens = np.random.default_rng(1).integers(0, 97, size=(1, 20))
    ref_logits, _ = hf_forward(model_hf, tokens)
    np.testing.assert_allclose(np.asarray(model.run(tokens).logits), ref_logits, atol=1e-5, rtol=0)


def test_gemma2_sliding_window_is_active():
    """With a window of 4 on even layers, long inputs differ from a no-window model."""
    model_hf, cfg_dict = tiny_hf("gemma2", n_heads=4, n_kv_heads=2)
    model = _jfig(model_hf, cfg_dict)
    tokens = np.random.default_rng(2).integers(0, 97, size=(1, 12))
    no_window = Model.from_config(model.config.replace(sliding_window=None, sliding_layers=()), model.params)
    a, b = np.asarray(model.run(tokens).logits), np.asarray(no_window.run(tokens).logits)
    assert np.abs(a[:, :4] - b[:, :4]).max() < 1e-5      # inside the window: identical
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-4      # beyond it: different
