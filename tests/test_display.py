"""treescope display of jfig's objects: the summary a notebook shows (sites, shapes, counts), not opaque
reprs or every weight."""
import jax
import numpy as np
import treescope

import jfig
from tests.support.graphs import graph_from_edges
from tests.support.tiny_models import tiny_model

SITES = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def test_sae_and_edits():
    sae = jfig.SAE.init_random(jax.random.PRNGKey(0), 16, 32, SITES[0])
    text = treescope.render_to_text(sae)
    assert text.startswith("SAE(\n  site='blocks.0.hook_resid_post',\n  architecture='relu',\n  d_in=16,\n  d_sae=32,")
    assert "W_enc=<jax.Array float32(16, 32)" in text
    clamp = treescope.render_to_text(jfig.Clamp(sae, 3, 1.5))
    assert "sae='SAE at blocks.0.hook_resid_post (relu, 16 -> 32)'" in clamp and "W_enc" not in clamp
    assert "feature=" in clamp and "value=" in clamp
    steer = treescope.render_to_text(jfig.Steer(SITES[0], np.ones(16, np.float32), 2.0))
    assert "site_name='blocks.0.hook_resid_post'" in steer
    assert "<div" in treescope.render_to_html(sae)


def test_graph_atlas_and_effects():
    g = graph_from_edges(SITES, [0, 0, 0], [1, 2, 3], [1, 1, 1], [4, 5, 6], [1, -1, 1], [0.5, 2.0, 1.0], n_features=8)
    text = treescope.render_to_text(g)
    assert "n_nodes=16" in text and "n_edges=3" in text and "pyarrow" not in text
    assert "'excitatory': 2, 'inhibitory': 1, 'gating': 0" in text
    assert "'blocks.0.hook_resid_post#2 -> blocks.2.hook_resid_post#5: inhibitory -2'" in text
    assert text.index("blocks.0.hook_resid_post': 8") < text.index("blocks.2.hook_resid_post': 8")
    model = tiny_model("llama")
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), model.config.d_model, 8, s) for i, s in enumerate(SITES)]
    tokens = np.random.default_rng(0).integers(1, model.config.vocab_size, (4, 8)).astype(np.int32)
    atlas = jfig.build_atlas(model, saes, tokens, progress=False)
    text = treescope.render_to_text(atlas)
    assert "'blocks.0.hook_resid_post': 'd_sae 8, 8 tracked'" in text and "n_tokens=" in text
    eff = jfig.measure_effects(model, saes, [(SITES[0], 1), (SITES[0], 2)], tokens, method="jacobian")
    text = treescope.render_to_text(eff)
    assert "method='jacobian'" in text and "sources={'blocks.0.hook_resid_post': 2}" in text
    assert "mean=<np.ndarray float" in text or "mean=<" in text


def test_model():
    text = treescope.render_to_text(tiny_model("llama"))
    assert text.startswith("Model(\n") and "family='llama'" in text and "n_layers=4" in text
    assert "sites='" in text and "hook_embed ... blocks.3.hook_resid_post" in text
    assert "'embed': <jax.Array float32(" in text
    fn = jfig.Model.from_function(lambda p, t, hook: hook(SITES[0], t[..., None] * 1.0), {}, sites=(SITES[0],),
                                  vocab_size=4)
    text = treescope.render_to_text(fn)
    assert "wraps='test_model.<locals>.<lambda>'" in text and "vocab_size=4" in text
