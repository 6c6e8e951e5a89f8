"""2x2 designs: the four-cell fit, intervention designs on planted and tiny models, stimulus designs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.edits import Clamp
from jfig.errors import JfigError
from jfig.integration import (feature_readout, fit_stimulus_design, four_cell_fit, intervention_design, logit_readout,
                              neuron_readout, site_values, stimulus_design)
from jfig.measure import measure_gating
from jfig.models.model import Model
from jfig.testing import tiny_model
from jfig.testing.planted import planted_model

G = 1.25


@pytest.fixture(scope="module")
def planted():
    model, saes, truth = planted_model(n_features=12, gating=[(4, 5, 6, G)], excitatory=[(0, 7, 2.0)],
                                       inhibitory=[(1, 8, 0.5)], seed=3)
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (40, 10))
    return model, saes, truth, tokens


def test_four_cell_fit_recovers_planted_coefficients():
    rng = np.random.default_rng(0)
    A, B, C, D = rng.normal(size=(4, 5, 3))
    f1, f2 = np.meshgrid([0.0, 1.0], [0.0, 1.0], indexing="ij")                 # [2, 2]: [F1, F2]
    cells = A[..., None, None] * f1 + B[..., None, None] * f2 + C[..., None, None] + D[..., None, None] * f1 * f2
    fit = four_cell_fit(cells)
    for got, want in zip((fit.A, fit.B, fit.C, fit.D), (A, B, C, D)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(JfigError, match=r"\[\.\.\., 2, 2\]"):
        four_cell_fit(np.zeros((3, 4)))


def test_planted_gate_found_and_unrelated_pair_not(planted):
    model, saes, truth, tokens = planted
    s0, s1 = truth.sites
    ca, cb = truth.values[(s0, 4)], truth.values[(s0, 5)]
    d = intervention_design(model, saes, (s0, 4), (s0, 5), [feature_readout(s1, 6), feature_readout(s1, 7)], tokens,
                            off="absent", n_inputs=16, n_null=8)
    # target 6 = bias + G·a·b: no main effects with the partner absent, D = G·a_on·b_on exactly
    np.testing.assert_allclose(d.D, [G * ca * cb, 0.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.gating, [G, 0.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.A, [0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(d.levels_a, (0.0, ca), rtol=1e-6)
    assert d.p_sign[0] < 1e-4 and d.p_null[0] == pytest.approx(1 / 9)
    assert not d.p_sign[1] < 0.5
    assert np.all(d.null_D[:, 0] == 0.0) and np.all(d.null_t[:, 0] == 0.0) and d.t[0] == np.inf
    assert d.by_presence()[(True, True)][0] == 16

    u = intervention_design(model, saes, (s0, 0), (s0, 1), [feature_readout(s1, 6), feature_readout(s1, 7),
                                                            feature_readout(s1, 8)], tokens, off="low", n_inputs=16,
                            n_null=8)
    np.testing.assert_allclose(u.D, 0.0, atol=1e-5)                            # first-order edges only
    lo, hi = u.levels_a
    np.testing.assert_allclose(u.A, [0.0, 2.0 * (hi - lo), 0.0], atol=1e-4)
    lo_b, hi_b = u.levels_b
    np.testing.assert_allclose(u.B, [0.0, 0.0, -0.5 * (hi_b - lo_b)], atol=1e-4)
    assert not (u.p_sign < 0.5).any()


def test_gating_statistic_equals_measure_gating(planted):
    model, saes, truth, tokens = planted
    s0, s1 = truth.sites
    d = intervention_design(model, saes, (s0, 4), (s0, 5), feature_readout(s1, 6), tokens, off="low",
                            n_inputs=16, n_null=0, skip_positions=0)
    g = measure_gating(model, saes, [((s0, 4), (s0, 5))], tokens, method="factorial", targets={s1: [6]})
    np.testing.assert_allclose(d.gating[0], g.mean[0, 0], rtol=1e-4)
    np.testing.assert_allclose(d.gating[0], G, rtol=1e-4)
    assert np.isnan(d.p_null).all()


def test_logit_readout_and_cross_site_pair():
    model, saes, truth = planted_model(n_sites=3, n_features=8, gating=[(0, 2, 1, 3, 2, 4, -0.75)], seed=1)
    s0, s1, s2 = truth.sites
    tokens = np.random.default_rng(1).integers(0, model.vocab_size, (24, 8))
    ca, cb = truth.values[(s0, 2)], truth.values[(s1, 3)]
    d = intervention_design(model, saes, (s0, 2), (s1, 3), [feature_readout(s2, 4), logit_readout(5, minus=9)],
                            tokens, off="absent", n_inputs=12, n_null=4)
    U = np.asarray(model.params["U"][2])
    want = -0.75 * ca * cb
    np.testing.assert_allclose(d.D, [want, want * (U[4, 5] - U[4, 9])], rtol=1e-4, atol=1e-6)
    assert d.p_sign[0] < 1e-3


def test_position_sparse_cells_equal_full_runs():
    model = tiny_model("llama", n_layers=2, d_model=16, seed=2)
    key = jax.random.split(jax.random.key(0), 2)
    sae0 = jfig.SAE.init_random(key[0], 16, 24, "blocks.0.hook_resid_post")
    sae1 = jfig.SAE.init_random(key[1], 16, 24, "blocks.1.hook_resid_post")
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (12, 10))
    f0 = np.asarray(sae0.encode(model.run(tokens, capture="blocks.0.hook_resid_post").cache["blocks.0.hook_resid_post"]))
    a, b = np.argsort(-(f0 > 0).sum((0, 1)))[:2]
    reads = [feature_readout("blocks.1.hook_resid_post", 3), neuron_readout(1, 5), logit_readout(7)]
    d = intervention_design(model, [sae0, sae1], (sae0.site, int(a)), (sae0.site, int(b)), reads, tokens,
                            off="opposite", n_inputs=6, n_null=2)
    assert d.levels_a[0] < 0 < d.levels_a[1]                                   # the opposite end of a's encoder
    # reference: full-sequence runs, one row per (input, cell), a and b clamped together at the input's position
    M, S = len(d.inputs), tokens.shape[1]
    cells = [(i, j) for i in (0, 1) for j in (0, 1)]
    rows = np.repeat(d.inputs, 4)
    pos = np.repeat(d.positions, 4)
    values = np.asarray([[d.levels_a[i], d.levels_b[j]] for _ in range(M) for i, j in cells], np.float32)
    edit = Clamp(sae0, jnp.asarray([a, b]), jnp.asarray(values)[:, None, :], positions=np.eye(S, dtype=bool)[pos])
    out = model.run(tokens[rows], edits=(edit,), capture=("blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"))
    r = np.arange(len(rows))
    want = np.stack([np.asarray(sae1.encode(out.cache["blocks.1.hook_resid_post"]))[r, pos, 3],
                     np.asarray(out.cache["blocks.1.mlp.hook_post"])[r, pos, 5], np.asarray(out.logits)[r, pos, 7]], 1)
    np.testing.assert_allclose(d.cells.transpose(0, 2, 3, 1).reshape(-1, 3), want, rtol=1e-4, atol=1e-5)
    shared = intervention_design(model, [sae0, sae1], (sae0.site, int(a)), (sae0.site, int(b)), reads, tokens,
                                 off="opposite", n_inputs=6, n_null=2,
                                 values=site_values(model, {sae0.site: sae0}, [sae0.site], tokens, 16),
                                 prefix=model.prefix(tokens, sae0.site, cache=True))
    np.testing.assert_allclose(shared.cells, d.cells, rtol=1e-5, atol=1e-6)


def test_intervention_errors(planted):
    model, saes, truth, tokens = planted
    s0, s1 = truth.sites
    with pytest.raises(JfigError, match="same feature"):
        intervention_design(model, saes, (s0, 4), (s0, 4), feature_readout(s1, 6), tokens)
    with pytest.raises(JfigError, match="off must be one of"):
        intervention_design(model, saes, (s0, 4), (s0, 5), feature_readout(s1, 6), tokens, off="zero")
    with pytest.raises(JfigError, match="before the first clamped site"):
        intervention_design(model, saes, (s1, 4), (s1, 5), feature_readout(s0, 6), tokens)
    with pytest.raises(JfigError, match="levels must be finite"):
        intervention_design(model, saes, (s0, 4), (s0, 5), feature_readout(s1, 6), tokens, levels=((0.0, 1.0),))
    with pytest.raises(JfigError, match="n_null must be >= 0"):
        intervention_design(model, saes, (s0, 4), (s0, 5), feature_readout(s1, 6), tokens, n_null=-1)
    with pytest.raises(JfigError, match="no SAE at site"):
        intervention_design(model, saes, ("blocks.9.hook_resid_post", 4), (s0, 5), feature_readout(s1, 6), tokens)


# ------------------------------------------------------------------------------------------ stimulus

def test_stimulus_interaction_equals_cell_contrast():
    rng = np.random.default_rng(0)
    N = 50
    la, lb = rng.choice(["neg", "pos"], N), rng.choice(["false", "true"], N)
    y = rng.normal(size=(N, 4))
    y[:, 0] += 3.0 * ((la == "pos") & (lb == "true"))                              # a planted interaction
    y[:, 1] += 2.0 * (la == "pos")                                                 # a main effect only
    d = fit_stimulus_design(y, la, lb, levels_a=("neg", "pos"), levels_b=("false", "true"))
    m = {(i, j): y[(la == ("neg", "pos")[i]) & (lb == ("false", "true")[j])].mean(0) for i in (0, 1) for j in (0, 1)}
    np.testing.assert_allclose(d.interaction, m[1, 1] - m[1, 0] - m[0, 1] + m[0, 0], rtol=1e-10)
    np.testing.assert_allclose(d.effects["a"]["estimate"], (m[1, 0] + m[1, 1] - m[0, 0] - m[0, 1]) / 2, rtol=1e-10)
    assert d.counts.sum() == N
    assert d.discriminative("interaction", k=1)[0]["feature"] == 0
    assert d.discriminative("a", k=1)[0]["feature"] in (0, 1)
    assert d.effects["interaction"]["p"][0] < 1e-4 and d.effects["interaction"]["p"][1] > 1e-3


def test_stimulus_t_squared_is_the_anova_f():
    rng = np.random.default_rng(1)
    la, lb = np.repeat(["x", "y"], 20), np.tile(np.repeat(["u", "v"], 10), 2)
    y = rng.normal(size=(40, 2))
    d = fit_stimulus_design(y, la, lb)
    cell = np.stack([y[(la == a) & (lb == b)] for a in "xy" for b in "uv"])         # [4, 10, 2]
    mu, cm = y.mean(0), cell.mean(1)
    ma, mb = cm.reshape(2, 2, 2).mean(1), cm.reshape(2, 2, 2).mean(0)
    ss_ab = 10 * ((cm.reshape(2, 2, 2) - ma[:, None] - mb[None] + mu) ** 2).sum((0, 1))
    mse = ((cell - cm[:, None]) ** 2).sum((0, 1)) / 36
    np.testing.assert_allclose(d.effects["interaction"]["t"] ** 2, ss_ab / mse, rtol=1e-9)


def test_stimulus_errors():
    y = np.zeros((4, 2))
    with pytest.raises(JfigError, match=r"a 2x2 design with an empty cell: no prompt has A='a1' and B='b1'"):
        fit_stimulus_design(y, ["a0", "a0", "a1", "a1"], ["b0", "b1", "b0", "b0"], levels_a=("a0", "a1"),
                            levels_b=("b0", "b1"))
    with pytest.raises(JfigError, match=r"unknown label\(s\) \['maybe'\]"):
        fit_stimulus_design(y, ["t", "f", "maybe", "t"], ["u", "v", "u", "v"], levels_a=("f", "t"))
    with pytest.raises(JfigError, match="exactly two levels"):
        fit_stimulus_design(y, ["t", "f", "maybe", "t"], ["u", "v", "u", "v"])
    with pytest.raises(JfigError, match="4 prompts but 3 labels"):
        fit_stimulus_design(y, ["t", "f", "t"], ["u", "v", "u", "v"])
    y[2, 1] = np.nan
    with pytest.raises(JfigError, match="NaN or infinite"):
        fit_stimulus_design(y, ["t", "f", "t", "f"], ["u", "v", "v", "u"])


class CharTokenizer:
    """One token per character (ids mod the vocabulary), a start token 1 in front."""

    def encode_batch(self, texts, add_bos=None):
        return [[1] + [2 + ord(c) % 60 for c in t] for t in texts]


def test_stimulus_design_through_a_model_reads_the_last_token():
    base = tiny_model("llama", n_layers=2, d_model=16, seed=4)
    model = Model.from_config(base.config, base.params, tokenizer=CharTokenizer())
    sae = jfig.SAE.init_random(jax.random.key(3), 16, 24, "blocks.0.hook_resid_post")
    texts = ["ab", "abc", "xy", "xyz", "ba", "bca", "yx", "zyx"]
    la = ["p", "p", "n", "n", "p", "p", "n", "n"]
    lb = ["s", "l", "s", "l", "s", "l", "s", "l"]
    d = stimulus_design(model, [sae], texts, la, lb, levels_a=("n", "p"), levels_b=("s", "l"))
    ids = CharTokenizer().encode_batch(texts)
    f = np.stack([np.asarray(sae.encode(model.run(np.asarray([i]), capture=sae.site).cache[sae.site]))[0, -1]
                  for i in ids])
    want = fit_stimulus_design(f, la, lb, levels_a=("n", "p"), levels_b=("s", "l"))
    np.testing.assert_allclose(d.interaction, want.interaction, rtol=1e-4, atol=1e-5)
    with pytest.raises(JfigError, match="8 texts but 7 labels"):
        stimulus_design(model, [sae], texts, la[:7], lb)
