"""The first-order (attribution) importance against a finite-difference partial ablation."""
import jax
import jax.numpy as jnp
import numpy as np

import jfig
from jfig.measure import attribution_effects
from jfig.models.config import llama_config
from jfig.models.forward import init_params


def test_attribution_is_the_first_order_ablation_effect():
    cfg = llama_config(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=40,
                       max_seq_len=16)
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.3))
    site = "blocks.1.hook_resid_post"
    sae = jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 24, site)
    toks = np.random.default_rng(0).integers(0, 40, size=(1, 6))
    acts = model.run(toks, capture=(site,)).cache[site]
    f = np.asarray(sae.encode(acts))[0]
    feats = [i for i in range(24) if (f[:, i] > 0).any()][:5]
    eff, n = attribution_effects(model, sae, toks, feats)

    def loss(tokens, edits=()):
        logits = model.run(tokens, edits=edits).logits
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -float(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1).sum())

    base = loss(toks)
    eps = 1e-3
    for k, i in enumerate(feats):
        # scale the feature by (1 - eps) where it is active: Δloss ≈ eps × (ablation's first-order change)
        delta = -eps * f[:, i][:, None] * np.asarray(sae.W_dec[i])[None, :]
        fd = abs(loss(toks, (jfig.Steer(site, jnp.asarray(delta)[None], 1.0),)) - base) / eps
        assert n[k] == (f[:, i] > 0).sum()
        np.testing.assert_allclose(eff[k] * n[k], fd, rtol=2e-2, atol=1e-4)
