"""Transcoder features as sources: measure_effects against hand loops of ClampTranscoder runs.

A transcoder feature is read at its input site and clamped where the transcoder writes (its output
site; a cross-layer transcoder also writes every later layer's output). The sweep engine starts the
suffix at the output site; these tests check it against full model runs with the public edit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import jfig
from jfig import ClampTranscoder, Transcoder, load_transcoders
from jfig.errors import JfigError
from jfig.testing import tiny_model

TGT = "blocks.1.hook_resid_post"
LO, HI = 0.1, 1.2


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    d = model.config.d_model
    tc = Transcoder.init_random(jax.random.PRNGKey(2), d, 10, "blocks.0.ln2.hook_normalized",
                                "blocks.0.hook_mlp_out", skip=True)          # input norm attached by measure_effects
    tc = Transcoder(W_enc=tc.W_enc, b_enc=jnp.full(10, 0.3), W_dec=tc.W_dec * 3.0, b_dec=tc.b_dec, W_skip=tc.W_skip,
                    read_site=tc.read_site, write_site=tc.write_site)
    sae = jfig.SAE.init_random(jax.random.PRNGKey(1), d, 12, TGT)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, size=(6, 7)))
    return model, tc, sae, toks


def hand_effects(model, tc, sae, toks, feature, rows, single=True):
    """Per-input clamp slopes read at the clamp position, from full runs with ClampTranscoder."""
    tc = tc.with_input_norm(model)
    out = []
    for i in rows:
        tk = toks[i][None]
        f = np.asarray(tc.encode(model.run(tk, capture=(tc.site,)).cache[tc.site]))[0, :, feature]
        p = int(np.argmax(f))

        def at(a):
            edit = ClampTranscoder.from_run(model, tk, tc, feature, a, positions=p if single else None)
            cache = model.run(tk, edits=edit, capture=(TGT,)).cache
            return np.asarray(sae.encode(cache[TGT]))[0, p]

        out.append((at(HI) - at(LO)) / (HI - LO))
    return np.stack(out)


@pytest.mark.parametrize("sparse", [True, False])
def test_transcoder_source_equals_clamp_transcoder_loop(setup, sparse):
    model, tc, sae, toks = setup
    feats = [0, 4, 7]
    eff = jfig.measure_effects(model, [tc, sae], {tc.site: feats}, toks, alphas=(LO, HI), inputs_per_source=3,
                               keep_per_input=True, sparse=sparse, progress=False)
    assert eff.targets.unique_sites() == (TGT,)           # nothing before the write site is a target
    checked = 0
    for r, f in enumerate(feats):
        used = [m for m in range(3) if eff.input_weight[r, m] > 0]
        ref = hand_effects(model, tc, sae, toks, f, eff.input_index[r, used])
        np.testing.assert_allclose(eff.per_input[r, used], ref, atol=3e-5)
        checked += len(used)
    assert checked >= 4 and np.abs(eff.mean).max() > 1e-3


def test_transcoder_source_clamps_the_write_site_not_the_read_site(setup):
    """The slopes differ from those of a clamp that steers the input site with the same row."""
    model, tc, sae, toks = setup
    eff = jfig.measure_effects(model, [tc, sae], {tc.site: [4]}, toks, alphas=(LO, HI), inputs_per_source=3,
                               keep_per_input=True, progress=False)
    r = [m for m in range(3) if eff.input_weight[0, m] > 0][0]
    i = int(eff.input_index[0, r])
    tk = toks[i][None]
    f = np.asarray(tc.with_input_norm(model).encode(model.run(tk, capture=(tc.site,)).cache[tc.site]))[0, :, 4]
    p = int(np.argmax(f))
    wrong = []
    for a in (HI, LO):
        delta = np.zeros((1, tk.shape[1], tc.d_out), np.float32)
        delta[0, p] = (a - f[p]) * np.asarray(tc.W_dec[4])
        cache = model.run(tk, edits=(jfig.Steer(tc.site, jnp.asarray(delta)),), capture=(TGT,)).cache
        wrong.append(np.asarray(sae.encode(cache[TGT]))[0, p])
    assert np.abs((wrong[0] - wrong[1]) / (HI - LO) - eff.per_input[0, r]).max() > 1e-3


def test_transcoder_source_jacobians_forward_reverse_and_clamp_agree(setup):
    """Effects are linear in the write-site edit up to the downstream nonlinearity: the Jacobian
    (forward and reverse mode) matches a narrow clamp's finite difference."""
    model, tc, sae, toks = setup
    kw = dict(targets={TGT: range(sae.d_sae)}, inputs_per_source=3, progress=False)
    fwd = jfig.measure_effects(model, [tc, sae], {tc.site: [0, 4]}, toks, method="jacobian", mode="forward", **kw)
    rev = jfig.measure_effects(model, [tc, sae], {tc.site: [0, 4]}, toks, method="jacobian", mode="reverse", **kw)
    assert np.abs(fwd.mean).max() > 1e-3
    np.testing.assert_allclose(rev.mean, fwd.mean, atol=1e-4)


def write_clt(folder, n, d, d_tc, seed=0):
    """A circuit-tracer cross-layer transcoder folder (resid_mid -> mlp_out at every layer)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        save_file({f"W_enc_{i}": (rng.normal(size=(d_tc, d)) / np.sqrt(d)).astype(np.float32),
                   f"b_enc_{i}": np.full(d_tc, 0.2, np.float32), f"b_dec_{i}": rng.normal(size=(d,)).astype(np.float32),
                   f"threshold_{i}": np.full(d_tc, 0.05, np.float32)}, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": (3 * rng.normal(size=(d_tc, n - i, d)) / np.sqrt(d_tc)).astype(np.float32)},
                  str(folder / f"W_dec_{i}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder",
                                                        "feature_input_hook": "hook_resid_mid",
                                                        "feature_output_hook": "hook_mlp_out"}))


def test_cross_layer_transcoder_source_writes_every_later_layer(setup, tmp_path):
    model, _, sae, toks = setup
    write_clt(tmp_path / "clt", model.config.n_layers, model.config.d_model, 9, seed=4)
    tc = load_transcoders(tmp_path / "clt")[0]
    assert tc.out_sites == ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")
    feats = [1, 5]
    eff = jfig.measure_effects(model, [tc, sae], {tc.site: feats}, toks, alphas=(LO, HI), inputs_per_source=3,
                               keep_per_input=True, progress=False)
    own_only = Transcoder(W_enc=tc.W_enc, b_enc=tc.b_enc, W_dec=tc.W_dec, b_dec=tc.b_dec, threshold=tc.threshold,
                          read_site=tc.read_site, write_site=tc.write_site, architecture=tc.architecture, jump=tc.jump)
    partial = jfig.measure_effects(model, [own_only, sae], {tc.site: feats}, toks, alphas=(LO, HI),
                                   inputs_per_source=3, keep_per_input=True, progress=False)
    for r, f in enumerate(feats):
        used = [m for m in range(3) if eff.input_weight[r, m] > 0]
        ref = hand_effects(model, tc, sae, toks, f, eff.input_index[r, used])
        np.testing.assert_allclose(eff.per_input[r, used], ref, atol=3e-5)
    assert np.abs(eff.mean - partial.mean).max() > 1e-3      # the later layer's write counts
    with pytest.raises(JfigError, match="cross-layer transcoder"):
        jfig.measure_effects(model, [tc, sae], {tc.site: feats}, toks, method="jacobian", mode="reverse",
                             progress=False)


def test_transcoder_needing_a_norm_on_a_wrapped_model_is_refused(setup):
    model, tc, sae, toks = setup
    wrapped = jfig.Model.from_function(lambda p, t, hook: model.run(t).logits, model.params, sites=model.sites)
    with pytest.raises(JfigError, match="normalised input"):
        jfig.measure_effects(wrapped, [tc, sae], {tc.site: [0]}, toks, progress=False)


def test_build_graph_with_a_transcoder_source(setup):
    """A build over [transcoder, SAE]: its transcoder-sourced edges are what measure_effects gives."""
    model, tc, sae, toks = setup
    toks = jnp.asarray(np.random.default_rng(5).integers(0, model.config.vocab_size, size=(48, 8)))
    g = jfig.build_graph(model, [tc, sae], toks, top_k=12, min_alignment=0.0, null_every=0,
                         correction="none", alpha=0.5, inputs_per_source=8, progress=False)   # gating on
    e = g.edges
    rows = np.asarray(e["source_site"]) == tc.site
    assert rows.any(), "no transcoder-sourced edge in the graph"
    src = sorted({int(s) for s in np.asarray(e["source"])[rows]})
    eff = jfig.measure_effects(model, [tc, sae], {tc.site: src}, toks, inputs_per_source=8, progress=False)
    for s, t, w in zip(np.asarray(e["source"])[rows], np.asarray(e["target"])[rows], np.asarray(e["weight"])[rows]):
        col = list(eff.targets).index((TGT, int(t)))
        assert np.sign(w) == np.sign(eff.mean[src.index(int(s)), col])


def test_transcoder_importance_ablation_and_attribution(setup, tmp_path):
    """Ablation importance of a transcoder feature equals a hand loop of ClampTranscoder-to-0 runs;
    attribution by jvp per feature equals attribution by one vjp per prediction (cross-layer too)."""
    from jfig.measure import ablation_effects, attribution_by_site, attribution_effects

    model, tc, sae, toks = setup
    tcn = tc.with_input_norm(model)
    feats = [0, 4, 7]
    eff, n = ablation_effects(model, tcn, toks, feats, batch_size=4)
    tk = jnp.asarray(toks)

    def nll(logits):
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -np.asarray(jnp.take_along_axis(logp, tk[:, 1:, None], -1)[..., 0])

    base = nll(model.run(tk).logits)
    f_all = np.asarray(tcn.encode(model.run(tk, capture=(tcn.site,)).cache[tcn.site]))
    for k, f in enumerate(feats):
        edit = ClampTranscoder.from_run(model, tk, tcn, f, 0.0)
        want = np.abs(nll(model.run(tk, edits=edit).logits) - base).sum() / (f_all[..., f] > 0).sum()
        assert n[k] == (f_all[..., f] > 0).sum()
        np.testing.assert_allclose(eff[k], want, rtol=1e-4, atol=1e-6)
    write_clt(tmp_path / "clt", model.config.n_layers, model.config.d_model, 9, seed=4)
    clt0 = load_transcoders(tmp_path / "clt")[0]
    for d in (tcn, clt0):
        fwd, _ = attribution_effects(model, d, toks, feats, batch_size=4)
        rev = attribution_by_site(model, [d, sae], toks, {d.site: feats, TGT: [0, 1]}, batch_size=4)
        assert np.isfinite(fwd).any() and np.nanmax(fwd) > 0
        np.testing.assert_allclose(rev[d.site][0], fwd, rtol=1e-4, atol=1e-7)


def test_gating_with_transcoders(setup):
    """mixed/factorial edit both features at their own sites: refused for a transcoder; the
    conditional statistic (source clamped as measure_effects does, modulator only read) works."""
    model, tc, sae, toks = setup
    sae0 = jfig.SAE.init_random(jax.random.PRNGKey(7), model.config.d_model, 8, "blocks.0.hook_resid_pre")
    pairs = [((tc.site, 4), (sae0.site, 1)), ((tc.site, 0), (sae0.site, 2))]
    with pytest.raises(JfigError, match="conditional"):
        jfig.measure_gating(model, [sae0, tc, sae], pairs, toks, method="mixed", targets={TGT: [0, 1]})
    g = jfig.measure_gating(model, [sae0, tc, sae], pairs, toks, method="conditional", targets={TGT: [0, 1, 2]},
                            inputs_per_pair=4)
    eff = jfig.measure_effects(model, [sae0, tc, sae], [(tc.site, 4), (tc.site, 0)], toks, targets={TGT: [0, 1, 2]},
                               inputs_per_source=4, keep_per_input=True, progress=False)
    np.testing.assert_allclose(g.slopes[0], np.nan_to_num(eff.per_input[0]), atol=1e-6)
