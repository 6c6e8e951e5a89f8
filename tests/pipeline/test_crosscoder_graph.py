"""crosscoder_graph: tested edges of a crosscoder's features, and matching them to per-layer SAEs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfig.errors import JfigError
from jfig.graph import diff_graphs
from jfig.interactions.neurons import mlp_read_in, mlp_readers
from jfig.measure.crosscoder import crosscoder_effects
from jfig.pipeline.crosscoder import crosscoder_graph, crosscoder_matching, decoder_agreement
from jfig.saes import SAE
from jfig.testing import tiny_model
from tests.measure.test_crosscoder_effects import SITES, random_crosscoder


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", n_layers=3, d_model=16)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (48, 8), 0, 64))
    cc = random_crosscoder()
    graph = crosscoder_graph(model, cc, tokens, sources_per_layer=3, inputs_per_source=16, null_sources=2,
                             correction="bh", progress=False)
    return model, tokens, cc, graph


def test_edges_are_the_measured_effects(setup):
    model, tokens, cc, graph = setup
    e = graph.edges.to_pydict()
    assert len(e["source"]) >= 1
    homes = cc.home_layers()
    sources = sorted(set(e["source"]))
    eff = crosscoder_effects(model, cc, tokens, sources, inputs_per_source=16, read="pre", progress=False)
    for s_site, s, t_site, t, w, kind in zip(e["source_site"], e["source"], e["target_site"], e["target"],
                                             e["weight"], e["kind"]):
        assert s_site == SITES[homes[s]] and t_site == SITES[homes[t]] and homes[t] > homes[s]
        r, c = sources.index(s), int(np.flatnonzero(eff.targets.features == t)[0])
        assert w == pytest.approx(float(eff.mean[r, c]), rel=1e-5)
        assert kind == ("excitatory" if w > 0 else "inhibitory")
    assert graph.manifest["kind"] == "crosscoder" and graph.manifest["n_tested"] > len(e["source"])


def test_null_threshold_removes_edges(setup):
    model, tokens, cc, graph = setup
    strict = crosscoder_graph(model, cc, tokens, sources_per_layer=3, inputs_per_source=16, null_sources=2,
                              null_quantile=0.999999, correction="bh", progress=False)
    none = crosscoder_graph(model, cc, tokens, sources_per_layer=3, inputs_per_source=16, null_sources=0,
                            correction="bh", progress=False)
    assert strict.edges.num_rows <= graph.edges.num_rows <= none.edges.num_rows
    assert none.edges.num_rows > strict.edges.num_rows


def test_matching_finds_a_crosscoders_own_rows(setup):
    model, tokens, cc, graph = setup
    site = SITES[1]
    homes = cc.home_layers()
    own = np.flatnonzero(homes == 1)
    W = cc.W_dec[own, 1]
    sae = SAE(W_enc=W.T, b_enc=jnp.zeros(len(own)), W_dec=W, b_dec=jnp.zeros(16), site=site)
    m = crosscoder_matching(cc, [sae])
    np.testing.assert_array_equal(m[site], own)
    np.testing.assert_allclose(decoder_agreement(cc, sae), 1.0, atol=1e-5)
    with pytest.raises(JfigError, match="none of the SAEs"):
        crosscoder_matching(cc, [SAE(W_enc=W.T, b_enc=jnp.zeros(len(own)), W_dec=W, b_dec=jnp.zeros(16),
                                     site="blocks.1.hook_resid_mid")])
    d = diff_graphs(graph, graph)
    assert d.summary()


def test_mlp_readers_are_the_mlp_read_in():
    model = tiny_model("llama", n_layers=3, d_model=16)
    r = mlp_readers(model, ["blocks.0.hook_resid_post"])                 # [1, d, F, 2]
    v = jax.random.normal(jax.random.key(0), (3, 16))
    sae = SAE(W_enc=v.T, b_enc=jnp.zeros(3), W_dec=v, b_dec=jnp.zeros(16), site="blocks.0.hook_resid_post")
    want = mlp_read_in(model, sae, None, 1)
    np.testing.assert_allclose(np.asarray(v) @ r[0, :, :, 0], np.asarray(want["up"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v) @ r[0, :, :, 1], np.asarray(want["gate"]), rtol=1e-4, atol=1e-5)


def test_errors(setup):
    model, tokens, cc, _ = setup
    with pytest.raises(JfigError, match="correction"):
        crosscoder_graph(model, cc, tokens, correction="holm", progress=False)
    with pytest.raises(JfigError, match="alpha"):
        crosscoder_graph(model, cc, tokens, alpha=2.0, progress=False)


def test_activation_matching_finds_a_copied_feature():
    """An SAE whose encoder reads one crosscoder feature's own pre-activation at its home layer fires
    exactly when that feature does: the activation matching pairs them."""
    cc = random_crosscoder()
    homes = cc.home_layers()
    xs = jax.random.normal(jax.random.key(3), (512, 3, 16))
    feat = int(np.flatnonzero(homes == 2)[0])
    f = np.asarray(cc.encode(xs))[:, feat]
    # an SAE at the home site with one feature equal to f (by construction: a linear read of the stacked
    # input is not available to it, so plant its activations through a lookup of the same rows)
    W = jnp.zeros((16, 4)).at[:, 0].set(jnp.linalg.lstsq(xs[:, 2], jnp.asarray(f))[0])
    sae = SAE(W_enc=W, b_enc=jnp.zeros(4), W_dec=W.T, b_dec=jnp.zeros(16), site=SITES[2], apply_b_dec_to_input=False)
    m = crosscoder_matching(cc, [sae], method="activation", activations=xs, min_similarity=0.3)
    corr = np.corrcoef(np.asarray(sae.encode(xs[:, 2]))[:, 0], f)[0, 1]
    assert corr > 0.3
    assert m[SITES[2]][0] == feat
    with pytest.raises(JfigError, match="activations="):
        crosscoder_matching(cc, [sae], method="activation")
