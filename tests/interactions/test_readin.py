"""The shared pieces: the norm split into a per-token scale and a linear map (against the model's own
norm), the SAE's per-token decode factor (against decode_direction), which layer reads a site, and
candidate pairs (every pair of a set; the atlas's most co-active pairs against numpy counts)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.testing import tiny_model
from jfig.atlas import Atlas, AtlasAccumulator
from jfig.errors import SiteError
from jfig.interactions import all_pairs, coactive_pairs, first_reader, norm_map, norm_scale, reading_layer
from jfig.interactions.readin import decode_scale, feature_directions
from jfig.models.layers import norm


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_norm_is_scale_times_linear_map(family):
    model = tiny_model(family)
    p = {k: v[1] for k, v in model.params["blocks"].items()}
    x = jax.random.normal(jax.random.key(0), (5, 16)) * 3 + 1
    want = norm(model.config, x, p["ln2_w"], p.get("ln2_b"))
    got = norm_scale(model.config, x)[:, None] * norm_map(model.config, x, p["ln2_w"]) + p.get("ln2_b", 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    y = jax.random.normal(jax.random.key(1), (5, 16))          # N is linear
    np.testing.assert_allclose(norm_map(model.config, 2 * x - y, p["ln2_w"]),
                               2 * norm_map(model.config, x, p["ln2_w"]) - norm_map(model.config, y, p["ln2_w"]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(normalize_activations="layer_norm"),
                                dict(normalize_activations="constant_norm_rescale"),
                                dict(center_input=True), dict(architecture="topk", k=3,
                                                               rescale_acts_by_decoder_norm=True)])
def test_decode_scale_matches_decode_direction(kw):
    sae = jfig.SAE.init_random(jax.random.key(2), 16, 10, "blocks.0.hook_resid_post", **kw)
    sae = jfig.SAE(**{**{f: getattr(sae, f) for f in ("W_enc", "b_enc", "b_dec", "site", "threshold")}, **kw,
                      "W_dec": sae.W_dec * jnp.linspace(0.5, 2.0, 10)[:, None]})
    x = jax.random.normal(jax.random.key(3), (2, 3, 16)) * 4 + 0.5
    _, stats = sae.encode_with_stats(x)
    feats = jnp.asarray([0, 4, 9])
    want = sae.decode_direction(feats[:, None, None], stats)                         # [3, 2, 3, 16]
    got = decode_scale(sae, stats, (2, 3))[None, ..., None] * feature_directions(sae, feats)[:, None, None]
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-6)


def test_reading_layers():
    cases = {"hook_embed": (0, 0), "blocks.2.hook_resid_pre": (2, 2), "blocks.2.hook_attn_out": (3, 2),
             "blocks.2.hook_resid_mid": (3, 2), "blocks.2.hook_mlp_out": (3, 3), "blocks.2.hook_resid_post": (3, 3)}
    for site, (attn, mlp) in cases.items():
        assert (first_reader(site, "attn"), first_reader(site, "mlp")) == (attn, mlp), site
    assert reading_layer("blocks.2.hook_resid_post", 5, "mlp", 4) == 4
    with pytest.raises(SiteError, match="no MLP reads"):
        reading_layer("blocks.3.hook_mlp_out", 4, "mlp")
    with pytest.raises(SiteError, match="residual basis"):
        first_reader("blocks.1.attn.hook_z", "attn")


def test_candidate_pairs():
    np.testing.assert_array_equal(all_pairs([5, 2, 2, 9]), [[2, 5], [2, 9], [5, 9]])
    site = "blocks.0.hook_resid_post"
    rng = np.random.default_rng(0)
    acts = ((rng.random((4, 16, 6)) < np.array([0.1, 0.6, 0.6, 0.3, 0.5, 0.05])) * 1.0).astype(np.float32)
    acc = AtlasAccumulator({site: 6}, window=0, top_contexts=0)
    acc.update({site: acts})
    atlas = Atlas.from_accumulator(acc)
    F = acts.reshape(-1, 6) > 0
    co = (F[:, :, None] & F[:, None, :]).sum(0)
    got = coactive_pairs(atlas, site, k=4)
    counts = [co[a, b] for a, b in got]
    iu = np.triu_indices(6, 1)
    assert counts == sorted(co[iu], reverse=True)[:4] and all(a < b for a, b in got)
    assert len(coactive_pairs(atlas, site, k=100, min_count=co[iu].max())) == (co[iu] == co[iu].max()).sum()
