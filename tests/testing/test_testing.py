"""jfig.testing: the strategies draw valid objects, properties of edits hold for whatever they draw, planted
models have exactly the interactions their truth lists, and `recovery` scores graphs correctly."""
import subprocess
import sys

import grimp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jfig
from jfig.edits import Ablate, Clamp, SetFeatures, Steer
from jfig.saes.sae import ARCHITECTURES
from jfig.testing import (FAMILIES, PlantedEdge, edits, planted_model, recovery, saes, setups, site_name, sites,
                          tiny_model, tiny_models, token_batches)
from tests.support.graphs import graph_from_edges

# the first draws of a process compile JAX's random number functions: slow on a busy machine, not a bad strategy
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------- strategies
# Property tests run eagerly (jax.disable_jit): every drawn model, site, SAE and edit structure would otherwise
# compile its own run (about a second each), while eager primitives are compiled once per shape and reused.

@PROPERTY
@given(model=tiny_models(), tokens=token_batches(64, max_batch=2, max_seq=8))
def test_tiny_models_run_and_give_finite_logits(model, tokens):
    assert model.config.family in FAMILIES and model.config.n_layers == 2 and model.config.d_model == 16
    assert tokens.dtype == np.int32 and tokens.ndim == 2 and tokens.shape in ((1, 4), (2, 8))
    assert tokens.min() >= 0 and tokens.max() < 64
    with jax.disable_jit():
        logits = model.run(tokens).logits
    assert logits.shape == (*tokens.shape, model.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_tiny_models_are_deterministic_in_their_seed_and_run_jitted():
    a, b, c = tiny_model("gemma2", seed=3), tiny_model("gemma2", seed=3), tiny_model("gemma2", seed=4)
    assert a.config == c.config
    np.testing.assert_array_equal(a.params["embed"], b.params["embed"])
    assert not np.array_equal(a.params["embed"], c.params["embed"])
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    with jax.disable_jit():
        eager = a.run(tokens).logits
    np.testing.assert_allclose(a.run(tokens).logits, eager, rtol=1e-5, atol=1e-5)


@PROPERTY
@given(data=st.data(), architecture=st.sampled_from(ARCHITECTURES), d_in=st.sampled_from([8, 16]))
def test_saes_encode_and_decode_at_their_site_width(data, architecture, d_in):
    sae = data.draw(saes("blocks.0.hook_resid_post", d_in, architecture))
    assert sae.architecture == architecture and sae.d_in == d_in and sae.d_sae == 32
    x = np.random.default_rng(0).normal(size=(2, 5, d_in)).astype(np.float32) * 3
    f, stats = sae.encode_with_stats(x)
    assert f.shape == (2, 5, sae.d_sae) and np.isfinite(np.asarray(f)).all() and (np.asarray(f) >= 0).all()
    out = sae.decode(f, stats)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(sae.reconstruct(x) + sae.error(x), x, atol=1e-5)
    if architecture == "topk":
        assert ((np.asarray(f) > 0).sum(-1) <= sae.k).all()
    if architecture in ("jumprelu", "batchtopk"):
        pre = np.asarray(sae.pre_activations(x))
        np.testing.assert_array_equal(f, np.where(pre > np.asarray(sae.threshold), np.maximum(pre, 0), 0))


@PROPERTY
@given(setup=setups(), data=st.data())
def test_drawn_edits_apply_through_model_run(setup, data):
    model, sae, tokens = setup
    assert sae.site in model.sites and sae.d_in == model.site_width(sae.site)
    batch, seq = tokens.shape
    edit = data.draw(edits(sae, seq_len=seq, batch=batch))
    assert isinstance(edit, (Clamp, Ablate, SetFeatures, Steer)) and edit.site == sae.site
    steer = data.draw(edits(model, seq_len=seq, batch=batch))
    assert isinstance(steer, Steer) and steer.site in model.sites
    with jax.disable_jit():
        out = model.run(tokens, edits=(edit, steer), capture=(sae.site,))
    assert out.logits.shape == (batch, seq, model.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all() and np.isfinite(np.asarray(out.cache[sae.site])).all()


def test_options_narrow_what_the_strategies_draw():
    llama = tiny_model("llama")            # attention: 4 heads of width 4

    @PROPERTY
    @given(model=tiny_models("gpt2", n_layers=(2, 3)), tokens=token_batches(50, shapes=[(2, 8)]), data=st.data(),
           sae=saes("blocks.1.attn.hook_z", 16, "topk", k=2, normalizations=("layer_norm",), tied=False,
                    hook_z_shape=(4, 4)))
    def check(model, tokens, data, sae):
        assert model.config.family == "gpt2" and model.config.n_layers in (2, 3)
        assert tokens.shape == (2, 8) and tokens.max() < 50
        assert sae.architecture == "topk" and sae.k == 2 and sae.normalize_activations == "layer_norm"
        assert sae.reshape_hook_z and not np.allclose(sae.W_dec, sae.W_enc.T)
        edit = data.draw(edits(sae, seq_len=8, batch=2))
        with jax.disable_jit():
            out = llama.run(tokens, edits=edit, capture=(sae.site,))
        assert out.cache[sae.site].shape == (2, 8, 4, 4) and np.isfinite(np.asarray(out.logits)).all()

    check()


def test_edits_refuses_kinds_a_target_cannot_take():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="not available"):
        edits(model, kinds=("clamp",))
    with pytest.raises(TypeError):
        edits("blocks.0.hook_resid_post")


def test_sites_are_ones_an_sae_can_read():
    model = tiny_model("gpt2")

    @settings(max_examples=20, deadline=None)
    @given(site=sites(model))
    def check(site):
        assert model.site_width(site) is not None
        assert "attn.hook_" not in site and site not in ("hook_embed", "hook_pos_embed")

    check()


# ---------------------------------------------------------------------------- properties of edits

@PROPERTY
@given(setup=setups(), data=st.data())
def test_clamping_a_feature_to_its_own_value_changes_nothing(setup, data):
    """Clamp keeps the SAE error and moves x along the feature's decoder direction by (value - f_i(x)):
    at the feature's own per-token value that is zero, for every architecture and normalisation."""
    model, sae, tokens = setup
    feature = data.draw(st.one_of(st.integers(0, sae.d_sae - 1),
                                  st.lists(st.integers(0, sae.d_sae - 1), min_size=2, max_size=3, unique=True)))
    with jax.disable_jit():
        clean = model.run(tokens, capture=(sae.site,))
        value = np.asarray(sae.encode(clean.cache[sae.site]))[..., feature]      # [batch, seq] or [batch, seq, n]
        out = model.run(tokens, edits=Clamp(sae, feature, value), capture=(sae.site,))
    np.testing.assert_allclose(out.cache[sae.site], clean.cache[sae.site], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.logits, clean.logits, rtol=1e-4, atol=1e-4)


def edited_positions(positions, batch: int, seq: int) -> np.ndarray:
    """bool [batch, seq]: where an edit with these `positions` acts."""
    out = np.zeros((batch, seq), bool)
    if positions is None:
        out[:] = True
    elif positions.dtype == jnp.bool_:
        out[:] = np.asarray(positions)
    else:
        out[:, np.asarray(positions)] = True
    return out


@PROPERTY
@given(setup=setups(normalizations=("none",), tied=True), data=st.data())
def test_ablated_feature_reads_zero_and_the_error_is_kept(setup, data):
    """Ablate sets x' = x - f_i(x) d_i: the SAE error of x is kept (x' = decode(f with f_i = 0) + error(x));
    for an SAE whose decoder row has unit dot product with its encoder column (tied, no input
    normalisation), encoding x' gives f_i = 0 at the ablated positions, and other positions keep x."""
    model, sae, tokens = setup
    batch, seq = tokens.shape
    edit = data.draw(edits(sae, seq_len=seq, batch=batch, kinds=("ablate",), max_features=1))
    feature = int(np.asarray(edit.feature).reshape(-1)[0])
    with jax.disable_jit():
        x = model.run(tokens, capture=(sae.site,)).cache[sae.site]
        x_new = model.run(tokens, edits=edit, capture=(sae.site,)).cache[sae.site]
    edited = edited_positions(edit.positions, batch, seq)
    f, stats = sae.encode_with_stats(x)
    expected = np.where(edited[..., None], sae.decode(f.at[..., feature].set(0.0), stats) + sae.error(x), x)
    np.testing.assert_allclose(x_new, expected, rtol=1e-5, atol=1e-4)
    f_new = np.asarray(sae.encode(x_new))[..., feature]
    assert np.abs(f_new[edited]).max(initial=0.0) < 1e-4
    np.testing.assert_array_equal(np.asarray(x_new)[~edited], np.asarray(x)[~edited])


# ------------------------------------------------------------------------------------ planted models

EXC = [(0, 1, 2.5), (1, 2, 3.0), (3, 3, 2.0)]
INH = [(4, 5, 2.5), (5, 6, 3.0)]
GATE = [(7, 8, 9, 2.0)]


@pytest.fixture(scope="module")
def planted():
    return planted_model(n_features=12, excitatory=EXC, inhibitory=INH, gating=GATE, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 64, size=(64, 8))


def test_planted_truth_lists_the_planted_edges(planted):
    _, saes_, truth = planted
    s0, s1 = truth.sites
    assert truth.sites == (site_name(0), site_name(1)) and [s.site for s in saes_] == list(truth.sites)
    assert truth.planted[:3] == tuple(PlantedEdge(s0, i, s1, j, "excitatory", w) for i, j, w in EXC)
    assert truth.planted[3:5] == tuple(PlantedEdge(s0, i, s1, j, "inhibitory", -w) for i, j, w in INH)
    assert truth.planted[5] == PlantedEdge(s0, 7, s1, 9, "gating", 2.0, (s0, 8))
    c7, c8 = truth.values[(s0, 7)], truth.values[(s0, 8)]
    assert 1 <= c7 <= 2 and 1 <= c8 <= 2
    # a gate input's first-order slope on its target is g times its partner's constant value
    assert truth.first_order == {**{(s0, i, s1, j): w for i, j, w in EXC}, **{(s0, i, s1, j): -w for i, j, w in INH},
                                 (s0, 7, s1, 9): 2.0 * c8, (s0, 8, s1, 9): 2.0 * c7}
    assert truth.gate((s0, 8), (s0, 7), (s1, 9)) == 2.0 and truth.gate((s0, 7), (s0, 8), (s1, 8)) == 0.0
    assert truth.slope((s0, 4), (s1, 5)) == -2.5 and truth.slope((s0, 4), (s1, 4)) == 0.0


@pytest.mark.parametrize("method", ["clamp", "ablate", "jacobian"])
def test_measure_effects_recovers_every_planted_slope_and_zero_elsewhere(planted, tokens, method):
    model, saes_, truth = planted
    s0, s1 = truth.sites
    eff = jfig.measure_effects(model, saes_, {s0: range(12)}, tokens, targets={s1: range(12)}, method=method,
                               inputs_per_source=16, progress=False)
    assert (eff.n > 0).all()
    np.testing.assert_allclose(eff.mean, truth.slopes(s0, s1), atol=1e-4)
    assert (eff.mean[truth.slopes(s0, s1) == 0] == 0).all()        # non-edges: exactly zero


@pytest.mark.parametrize("method", ["factorial", "mixed"])
def test_planted_gate_is_the_only_interaction_of_second_order(planted, tokens, method):
    model, saes_, truth = planted
    s0, s1 = truth.sites
    pairs = [((s0, 7), (s0, 8)), ((s0, 0), (s0, 7)), ((s0, 1), (s0, 4))]
    g = jfig.measure_gating(model, saes_, pairs, tokens, method=method, targets={s1: range(12)}, inputs_per_pair=16)
    expected = np.zeros((3, 12))
    expected[0, 9] = 2.0
    np.testing.assert_allclose(g.mean, expected, atol=1e-4)


def test_chained_sites_have_exact_total_effects():
    """Slopes compose along paths through intermediate sites and add to a direct edge: x1_0 = .. + 2 x0_0,
    x2_0 = .. + 3 x1_0 + 0.5 x0_0 gives x0_0 -> x2_0 a slope of 6.5; x0_1 -> x1_1 -> x2_2 a composed edge of 2."""
    s0, s1, s2 = (site_name(s) for s in range(3))
    model, saes_, truth = planted_model(n_sites=3, n_features=6,
                                        excitatory=[(0, 0, 1, 0, 2.0), (1, 0, 2, 0, 3.0), (0, 0, 2, 0, 0.5),
                                                    (0, 1, 1, 1, 1.0), (s1, 1, s2, 2, 2.0)],
                                        inhibitory=[(s0, 2, s1, 3, 1.0)])
    assert truth.slope((s0, 0), (s2, 0)) == 6.5 and truth.slope((s0, 0), (s1, 0)) == 2.0
    assert truth.slope((s0, 1), (s2, 2)) == 2.0 and truth.slope((s0, 2), (s1, 3)) == -1.0
    assert len(truth.planted) == 6 and set(truth.edges) - set(truth.planted) == {
        PlantedEdge(s0, 0, s2, 0, "excitatory", 6.5), PlantedEdge(s0, 1, s2, 2, "excitatory", 2.0)}
    toks = np.random.default_rng(1).integers(0, 64, size=(48, 6))
    eff = jfig.measure_effects(model, saes_, {s0: range(6), s1: range(6)}, toks, targets={s1: range(6), s2: range(6)},
                               inputs_per_source=16, progress=False)
    want = np.block([[truth.slopes(s0, s1), truth.slopes(s0, s2)],
                     [truth.slopes(s1, s1), truth.slopes(s1, s2)]])
    np.testing.assert_allclose(eff.mean, want, atol=1e-4)


def test_gate_with_its_modulator_at_an_earlier_site():
    s0, s1, s2 = (site_name(s) for s in range(3))
    model, saes_, truth = planted_model(n_sites=3, n_features=4, gating=[(s1, 2, s0, 1, s2, 3, 1.5)])
    c1, c2 = truth.values[(s0, 1)], truth.values[(s1, 2)]
    assert truth.first_order == {(s0, 1, s2, 3): 1.5 * c2, (s1, 2, s2, 3): 1.5 * c1}
    toks = np.random.default_rng(2).integers(0, 64, size=(32, 6))
    g = jfig.measure_gating(model, saes_, [((s1, 2), (s0, 1)), ((s1, 0), (s0, 1))], toks, method="factorial",
                            targets={s2: range(4)}, inputs_per_pair=8)
    np.testing.assert_allclose(g.mean, [[0, 0, 0, 1.5], [0, 0, 0, 0]], atol=1e-4)
    eff = jfig.measure_effects(model, saes_, {s0: [1], s1: [2]}, toks, targets={s2: range(4)}, inputs_per_source=8,
                               progress=False)
    np.testing.assert_allclose(eff.mean, [[0, 0, 0, 1.5 * c2], [0, 0, 0, 1.5 * c1]], atol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(excitatory=[(0, 12, 1.0)]), "feature 12"),
    (dict(excitatory=[(1, 0, 0, 1, 1.0)]), "source site must come before"),
    (dict(excitatory=[(0, 1, 0.0)]), "not zero"),
    (dict(excitatory=[(0, 1, 1.0)], inhibitory=[(0, 1, 1.0)]), "planted twice"),
    (dict(n_sites=3, excitatory=[(0, 0, 1, 7, 1.0)], gating=[(1, 7, 1, 8, 2, 9, 1.0)]), "gate input"),
    (dict(gating=[(7, 8, 9, 1.0), (8, 7, 9, 2.0)]), "planted twice"),
    (dict(n_sites=3, gating=[(7, 8, 9, 1.0)], excitatory=[(1, 9, 2, 0, 1.0)]), "gate target"),
    (dict(gating=[(7, 7, 9, 1.0)]), "two different"),
    (dict(excitatory=[(0, 1)]), "expected"),
])
def test_planted_model_refuses_what_it_cannot_make_exact(kw, match):
    kw = {"n_features": 12, **kw}
    with pytest.raises(jfig.OptionError, match=match):
        planted_model(**kw)


def test_build_graph_recovers_the_planted_graph(planted, tokens):
    model, saes_, truth = planted
    opts = dict(top_k=12, min_alignment=0.0, inputs_per_source=32, progress=False)
    graph = jfig.build_graph(model, saes_, tokens, **opts)
    r = recovery(graph, truth)
    assert r["precision"] == 1.0 and r["recall"] == 1.0, (r["missed"], r["spurious"])
    assert r["sign_agreement"] == 1.0 and r["max_slope_error"] < 1e-4
    assert r["gating"]["n_matched"] == 1 and r["first_order"]["n_matched"] == 7
    without = recovery(jfig.build_graph(model, saes_, tokens, gating=False, **opts), truth)
    assert without["first_order"]["recall"] == 1.0 and without["gating"]["n_found"] == 0
    assert without["recall"] == 7 / 8 and [e.kind for e in without["missed"]] == ["gating"]


# ------------------------------------------------------------------------------------------- recovery

def test_recovery_scores_a_hand_made_graph():
    sites_ = [site_name(0), site_name(1)]
    s0, s1 = sites_

    class Truth:             # recovery reads only `edges`
        edges = (PlantedEdge(s0, 0, s1, 0, "excitatory", 2.0), PlantedEdge(s0, 1, s1, 1, "inhibitory", -1.0),
                 PlantedEdge(s0, 2, s1, 2, "excitatory", 1.0), PlantedEdge(s0, 3, s1, 3, "excitatory", 0.5),
                 PlantedEdge(s0, 4, s1, 5, "gating", 1.5, (s0, 6)))

    # found: 0->0 (+2.1, right), 1->1 (+0.8: wrong sign), 2->2 (+1.0 exact), 5->5 (spurious), and the gate with its
    # inputs named the other way round (weight 1.2); 3->3 missed
    graph = graph_from_edges(sites_, [0, 0, 0, 0], [0, 1, 2, 5], [1, 1, 1, 1], [0, 1, 2, 5], [1, 1, 1, 1],
                             [2.1, 0.8, 1.0, 0.3], n_features=8, gating=[(0, 4, 0, 6, 1, 5)])
    edges = graph.edges.to_pydict()
    edges["weight"] = [2.1, 0.8, 1.0, 0.3, 1.2]
    graph = jfig.InteractionGraph.from_tables(graph.nodes, edges, graph.manifest)
    r = recovery(graph, Truth)
    assert (r["n_true"], r["n_found"], r["n_matched"]) == (5, 5, 4)
    assert r["precision"] == 4 / 5 and r["recall"] == 4 / 5 and r["sign_agreement"] == 3 / 4
    assert r["max_slope_error"] == pytest.approx(1.8)            # 0.8 against -1.0
    assert r["first_order"]["precision"] == 3 / 4 and r["first_order"]["recall"] == 3 / 4
    assert r["gating"]["recall"] == 1.0 and r["gating"]["max_slope_error"] == pytest.approx(0.3)
    assert r["missed"] == [Truth.edges[3]]
    assert [(e.source, e.target) for e in r["spurious"]] == [(5, 5)]
    empty = recovery(graph_from_edges(sites_, [], [], [], [], [], n_features=8), Truth)
    assert np.isnan(empty["precision"]) and empty["recall"] == 0.0 and np.isnan(empty["max_slope_error"])


# ------------------------------------------------------------------------------------- the package

def test_strategies_name_pip_install_hypothesis_when_it_is_missing():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "from jfig.testing import planted_model, recovery\n"
            "planted_model(excitatory=[(0, 1, 1.0)])\n"
            "try:\n    from jfig.testing import tiny_models\nexcept ImportError as e:\n    print('A', e)\n"
            "try:\n    import jfig.testing.strategies\nexcept ImportError as e:\n    print('B', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("A ") and lines[1].startswith("B ")
    assert all("pip install hypothesis" in line for line in lines)


def test_nothing_in_jfig_imports_jfig_testing():
    graph = grimp.build_graph("jfig", include_external_packages=False)
    importers = {m for m in graph.find_modules_that_directly_import("jfig.testing")}
    for module in graph.find_children("jfig.testing"):
        importers |= graph.find_modules_that_directly_import(module)
    assert {m for m in importers if not m.startswith("jfig.testing")} == set()
