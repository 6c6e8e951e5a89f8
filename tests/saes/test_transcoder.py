"""Transcoders: the SAELens and circuit-tracer file formats, transcoders as targets of measure_effects,
and ClampTranscoder at the write site."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import jfig
from jfig.edits import ClampTranscoder
from jfig.errors import FormatError, JfigError
from jfig.saes import Transcoder, load_sae, load_transcoders
from tests.support.tiny_models import tiny_model

D_IN, D_TC, D_OUT = 6, 10, 5


def rng_weights(seed=0, d_in=D_IN, d_tc=D_TC, d_out=D_OUT):
    rng = np.random.default_rng(seed)
    return {"enc": rng.normal(size=(d_in, d_tc)).astype(np.float32),
            "b_enc": rng.normal(size=(d_tc,)).astype(np.float32) * 0.3,
            "dec": rng.normal(size=(d_tc, d_out)).astype(np.float32),
            "b_dec": rng.normal(size=(d_out,)).astype(np.float32),
            "skip": rng.normal(size=(d_out, d_in)).astype(np.float32),   # used as x @ skip.T in both formats
            # thresholds of both signs: the two JumpReLU conventions differ where thr <= 0
            "thr": np.linspace(-0.6, 0.6, d_tc).astype(np.float32)}


def x_in(d_in=D_IN, seed=7):
    return np.random.default_rng(seed).normal(size=(3, 4, d_in)).astype(np.float32)


# --------------------------------------------------------------------------------------------- SAELens


def write_saelens(folder, arch, w, hook="blocks.1.hook_resid_mid", hook_out="blocks.1.hook_mlp_out", **cfg_kw):
    folder.mkdir(parents=True)
    cfg = {"d_in": D_IN, "d_sae": D_TC, "d_out": D_OUT, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "architecture": arch, "metadata": {"hook_name": hook, "hook_name_out": hook_out,
                                              "sae_lens_version": "6.0.0"}, **cfg_kw}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"W_enc": w["enc"], "b_enc": w["b_enc"], "W_dec": w["dec"], "b_dec": w["b_dec"]}
    if "jumprelu" in arch:
        tensors["threshold"] = w["thr"]
    if "skip" in arch:
        tensors["W_skip"] = w["skip"]
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_reference(arch, w, x):
    pre = x @ w["enc"] + w["b_enc"]
    f = np.maximum(pre, 0) * (pre > w["thr"]) if "jumprelu" in arch else np.maximum(pre, 0)
    out = f @ w["dec"] + w["b_dec"]
    if "skip" in arch:
        out = out + x @ w["skip"].T
    return f, out


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoder_matches_format_maths(tmp_path, arch):
    w = rng_weights()
    [tc] = load_transcoders(write_saelens(tmp_path / arch, arch, w))
    assert (tc.read_site, tc.write_site, tc.site, tc.out_site) == (
        "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    assert (tc.d_in, tc.d_sae, tc.d_out) == (D_IN, D_TC, D_OUT)
    x = x_in()
    f_ref, out_ref = saelens_reference(arch, w, x)
    f = np.asarray(tc.encode(jnp.asarray(x)))
    assert (f > 0).any() and (f == 0).any()
    np.testing.assert_allclose(f, f_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tc.forward(jnp.asarray(x))), out_ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(tc.decode(jnp.asarray(f_ref), jnp.asarray(x))), out_ref, atol=1e-4)
    # a cfg.json or the weights file inside the folder load the same
    [again] = load_transcoders(tmp_path / arch / "sae_weights.safetensors")
    np.testing.assert_array_equal(np.asarray(again.W_enc), np.asarray(tc.W_enc))


def test_saelens_jumprelu_differs_from_no_relu_convention(tmp_path):
    """SAELens's JumpReLU is relu(pre)*(pre > thr): with thr < 0, -thr > pre > thr gives 0, not pre."""
    w = rng_weights()
    [tc] = load_transcoders(write_saelens(tmp_path / "a", "jumprelu_transcoder", w))
    pre = np.asarray(tc.pre_activations(jnp.asarray(x_in())))
    f = np.asarray(tc.encode(jnp.asarray(x_in())))
    between = (pre < 0) & (pre > w["thr"])
    assert between.any() and (f[between] == 0).all()


def test_load_sae_refuses_transcoders(tmp_path):
    w = rng_weights()
    folder = write_saelens(tmp_path / "tc", "skip_transcoder", w)
    with pytest.raises(FormatError, match="load_transcoders"):
        load_sae(folder)
    ct = write_ct(tmp_path / "ct", [rng_weights(1, D_IN, D_TC, D_IN)], {})
    with pytest.raises(FormatError, match="load_transcoders"):
        load_sae(ct)


def test_saelens_transcoder_errors(tmp_path):
    w = rng_weights()
    with pytest.raises(FormatError, match="hook_name_out"):
        load_transcoders(write_saelens(tmp_path / "a", "transcoder", w, hook_out=None))
    with pytest.raises(FormatError, match="apply_b_dec_to_input"):
        load_transcoders(write_saelens(tmp_path / "b", "transcoder", w, apply_b_dec_to_input=True))
    with pytest.raises(FormatError, match="'architecture'.*'standard'"):
        load_transcoders(write_saelens(tmp_path / "c", "standard", w))
    with pytest.raises(FormatError, match="not a site"):
        load_transcoders(write_saelens(tmp_path / "d", "transcoder", w, hook="blocks.1.mystery"))
    bad = write_saelens(tmp_path / "e", "skip_transcoder", w)
    save_file({"W_enc": w["enc"], "b_enc": w["b_enc"], "W_dec": w["dec"], "b_dec": w["b_dec"],
               "W_skip": w["skip"].T.copy()}, str(bad / "sae_weights.safetensors"))
    with pytest.raises(FormatError, match="'W_skip' has shape"):
        load_transcoders(bad)


# --------------------------------------------------------------------------------------------- circuit-tracer


def write_ct(folder, layers, cfg, names=None):
    """A circuit-tracer transcoder_set folder; layers: weight dicts (jfig-orientation 'enc' [d_in, d_tc])."""
    folder.mkdir(parents=True)
    cfg = {"model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid",
           "feature_output_hook": "hook_mlp_out", **cfg}
    for i, w in enumerate(layers):
        tensors = {"W_enc": w["enc"].T.copy(), "b_enc": w["b_enc"], "W_dec": w["dec"], "b_dec": w["b_dec"]}
        tensors.update({key: w[key] for key in ("activation_function.threshold", "W_skip", "k") if key in w})
        save_file(tensors, str(folder / (names[i] if names else f"layer_{i}.safetensors")))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def ct_reference(w, x, activation, k=None):
    pre = x @ w["enc"] + w["b_enc"]                        # = x @ W_enc.T + b_enc with the file's W_enc
    if activation == "jumprelu":
        f = pre * (pre > w["activation_function.threshold"])
    elif activation == "topk":
        keep = np.argsort(-pre, axis=-1)[..., :k]
        f = np.zeros_like(pre)
        np.put_along_axis(f, keep, np.take_along_axis(pre, keep, -1), -1)
    else:
        f = np.maximum(pre, 0)
    out = f @ w["dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return f, out


@pytest.mark.parametrize("variant", ["relu", "jumprelu", "topk_cfg", "topk_tensor", "skip"])
def test_circuit_tracer_transcoders_match_format_maths(tmp_path, variant):
    d = D_IN
    layers = []
    for i in range(3):
        w = rng_weights(i, d, D_TC, d)
        if variant == "jumprelu":
            w["activation_function.threshold"] = w["thr"]
        if variant == "skip":
            w["W_skip"] = np.random.default_rng(10 + i).normal(size=(d, d)).astype(np.float32)
        if variant == "topk_tensor":
            w["k"] = np.asarray(3, np.int64)
        layers.append(w)
    cfg = {"activation": "topk", "k": 3} if variant == "topk_cfg" else (
        {"activation": "topk"} if variant == "topk_tensor" else {})
    tcs = load_transcoders(write_ct(tmp_path / variant, layers, cfg))
    assert [t.site for t in tcs] == [f"blocks.{i}.hook_resid_mid" for i in range(3)]
    assert [t.out_site for t in tcs] == [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    activation = "topk" if variant.startswith("topk") else ("jumprelu" if variant == "jumprelu" else "relu")
    x = x_in(d)
    for tc, w in zip(tcs, layers):
        assert tc.architecture == activation
        f_ref, out_ref = ct_reference(w, x, activation, 3)
        f = np.asarray(tc.encode(jnp.asarray(x)))
        assert (f != 0).any() and (f == 0).any()
        np.testing.assert_allclose(f, f_ref, atol=1e-5)
        np.testing.assert_allclose(np.asarray(tc.forward(jnp.asarray(x))), out_ref, atol=1e-4)
    if activation == "jumprelu":   # no ReLU: pre in (thr, 0) with thr < 0 is kept, negative
        assert (np.asarray(tcs[0].encode(jnp.asarray(x))) < 0).any()


def test_circuit_tracer_listed_files_and_errors(tmp_path):
    layers = [rng_weights(i, D_IN, D_TC, D_IN) for i in range(2)]
    folder = write_ct(tmp_path / "listed", layers, {"transcoders": ["b.safetensors", "a.safetensors"]},
                      names=["b.safetensors", "a.safetensors"])
    tcs = load_transcoders(folder / "config.yaml")
    np.testing.assert_allclose(np.asarray(tcs[1].W_enc), layers[1]["enc"])
    with pytest.raises(FormatError, match="no W_enc_"):
        load_transcoders(write_ct(tmp_path / "clt", [], {"model_kind": "cross_layer_transcoder"}))
    with pytest.raises(FormatError, match="remote"):
        load_transcoders(write_ct(tmp_path / "hf", [], {"transcoders": ["hf://org/repo/layer_0.safetensors"]}))
    gap = write_ct(tmp_path / "gap", layers, {}, names=["layer_0.safetensors", "layer_2.safetensors"])
    with pytest.raises(FormatError, match="missing layer_1"):
        load_transcoders(gap)
    with pytest.raises(FormatError, match="'k'"):
        load_transcoders(write_ct(tmp_path / "nok", layers, {"activation": "topk"}))


def test_input_norm_hooks(tmp_path):
    """mlp.hook_in reads the MLP's input (the model's second norm of hook_resid_mid); ln2.hook_normalized
    that norm's normalisation before its weight and bias (where TransformerLens places the hook)."""
    for family in ("llama", "gpt2"):
        model = tiny_model(family)
        d = model.config.d_model
        layers = [rng_weights(i, d, D_TC, d) for i in range(model.config.n_layers)]
        hook = "ln2.hook_normalized" if family == "llama" else "mlp.hook_in"
        folder = write_ct(tmp_path / family, layers,
                          {"feature_input_hook": hook, "feature_output_hook": "mlp.hook_out"})
        raw = load_transcoders(folder)
        assert raw[2].site == "blocks.2.hook_resid_mid" and raw[2].out_site == "blocks.2.hook_mlp_out"
        resid = np.asarray(model.run(jnp.asarray([[1, 2, 3, 4]]), capture=("blocks.2.hook_resid_mid",))
                           .cache["blocks.2.hook_resid_mid"])
        with pytest.raises(JfigError, match="with_input_norm"):
            raw[2].encode(jnp.asarray(resid))
        tcs = load_transcoders(folder, model=model)
        blocks = {k: np.asarray(v[2]) for k, v in model.params["blocks"].items()}
        if family == "llama":                          # ln2.hook_normalized: no weight
            h = resid / np.sqrt((resid ** 2).mean(-1, keepdims=True) + model.config.norm_eps)
        else:
            c = resid - resid.mean(-1, keepdims=True)
            h = c / np.sqrt((c ** 2).mean(-1, keepdims=True) + model.config.norm_eps) * blocks["ln2_w"]
            h = h + blocks["ln2_b"]
        f_ref, _ = ct_reference(layers[2], h, "relu")
        np.testing.assert_allclose(np.asarray(tcs[2].encode(jnp.asarray(resid))), f_ref, atol=1e-4)


# --------------------------------------------------------------------------------------------- in a model


SRC = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    d = model.config.d_model
    sae = jfig.SAE.init_random(jax.random.PRNGKey(1), d, 12, SRC)
    sae = jfig.SAE(W_enc=sae.W_enc, b_enc=jnp.full(12, 0.05), W_dec=sae.W_dec * 2.0, b_dec=sae.b_dec, site=SRC,
                   apply_b_dec_to_input=False)
    tc = Transcoder.init_random(jax.random.PRNGKey(2), d, 14, "blocks.2.ln2.hook_normalized",
                                "blocks.2.hook_mlp_out", skip=True).with_input_norm(model)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, size=(6, 7)))
    return model, sae, tc, toks


def test_transcoder_as_measure_target_equals_naive_loop(setup):
    model, sae, tc, toks = setup
    feats = [0, 3, 5]
    lo, hi = 0.2, 1.5
    eff = jfig.measure_effects(model, [sae, tc], {SRC: feats}, toks, method="clamp", targets={tc.site: range(14)},
                               alphas=(lo, hi), inputs_per_source=3, keep_per_input=True, progress=False)
    assert eff.per_input.shape == (3, 3, 14)
    checked = 0
    for r, f in enumerate(feats):
        for m in range(3):
            if eff.input_weight[r, m] == 0:
                continue
            tk = toks[eff.input_index[r, m]][None]
            fi = np.asarray(sae.encode(model.run(tk, capture=(SRC,)).cache[SRC])[0, :, f])
            p = int(np.argmax(fi))

            def at(a):
                out = model.run(tk, edits=(jfig.Clamp(sae, f, a, positions=p),), capture=(tc.site,))
                return np.asarray(tc.encode(out.cache[tc.site])[0, p])

            ref = (at(hi) - at(lo)) / (hi - lo)
            np.testing.assert_allclose(eff.per_input[r, m], ref, atol=2e-5)
            checked += 1
    assert checked >= 3 and np.abs(eff.mean).max() > 1e-3


def test_transcoder_is_refused_as_sae_source(setup):
    model, sae, tc, toks = setup
    with pytest.raises(JfigError, match="ClampTranscoder"):
        model.run(toks, edits=(jfig.Clamp(tc, 0, 1.0),))


def test_clamp_transcoder_equals_hand_edit_of_write_site(setup):
    model, sae, tc, toks = setup
    clean = model.run(toks, capture=(tc.site,)).cache[tc.site]
    f = np.asarray(tc.encode(clean))                                   # [b, s, d_tc]
    W_dec = np.asarray(tc.W_dec)
    for feature, value, positions in ((4, 2.5, None), (np.array([1, 7]), np.array([0.0, 3.0]), 2)):
        edit = ClampTranscoder.from_run(model, toks, tc, feature, value, positions=positions)
        assert edit.site == "blocks.2.hook_mlp_out"
        got = model.run(toks, edits=(edit,)).logits
        feats = np.atleast_1d(feature)
        delta = np.einsum("bsn,nd->bsd", np.broadcast_to(value, f.shape[:2] + feats.shape) - f[..., feats],
                          W_dec[feats])
        if positions is not None:
            delta = delta * (np.arange(toks.shape[1]) == positions)[None, :, None]
        want = model.run(toks, edits=(jfig.Steer(tc.out_site, jnp.asarray(delta), 1.0),)).logits
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        assert np.abs(np.asarray(got) - np.asarray(model.run(toks).logits)).max() > 1e-4
    # the clamped feature, re-read from the edited run's write site with the transcoder's error kept, is `value`
    edit = ClampTranscoder.from_run(model, toks, tc, 4, 2.5)
    out = model.run(toks, edits=(edit,), capture=(tc.site, tc.out_site)).cache
    clean_out = model.run(toks, capture=(tc.out_site,)).cache[tc.out_site]
    err = clean_out - tc.forward(clean)
    recon = np.asarray(out[tc.out_site] - err - tc.decode(jnp.zeros_like(tc.encode(out[tc.site])), out[tc.site]))
    coeff = np.linalg.lstsq(W_dec.T, recon.reshape(-1, W_dec.shape[1]).T, rcond=None)[0].T
    np.testing.assert_allclose(coeff[:, 4], 2.5, atol=1e-3)


def test_clamp_transcoder_with_other_edits_is_exact(setup):
    """With an earlier source clamp in the run, `current` is read under that clamp (from_run's edits)."""
    model, sae, tc, toks = setup
    src = jfig.Clamp(sae, 3, 2.0)
    edit = ClampTranscoder.from_run(model, toks, tc, 5, 0.0, edits=(src,))
    got = model.run(toks, edits=(src, edit)).logits
    under = model.run(toks, edits=(src,), capture=(tc.site,)).cache[tc.site]
    delta = (0.0 - np.asarray(tc.encode(under))[..., 5])[..., None] * np.asarray(tc.W_dec[5])
    want = model.run(toks, edits=(src, jfig.Steer(tc.out_site, jnp.asarray(delta), 1.0))).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_clamp_transcoder_checks(setup):
    model, sae, tc, toks = setup
    with pytest.raises(jfig.ShapeError, match="out of range"):
        model.run(toks, edits=(ClampTranscoder(tc, 99, 1.0, 0.0),))
    with pytest.raises(jfig.ShapeError, match="current shape"):
        model.run(toks, edits=(ClampTranscoder(tc, 1, 1.0, jnp.zeros((2, 3))),))


# --------------------------------------------------------------------------------------------- cross-layer


def write_clt(folder, n, d, d_tc=D_TC, seed=0, hooks=("hook_resid_mid", "hook_mlp_out")):
    """A circuit-tracer cross-layer transcoder folder; returns the file tensors per layer."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        t = {"W_enc": rng.normal(size=(d_tc, d)).astype(np.float32) / np.sqrt(d),
             "b_enc": rng.normal(size=(d_tc,)).astype(np.float32) * 0.3,
             "b_dec": rng.normal(size=(d,)).astype(np.float32),
             "threshold": np.linspace(-0.4, 0.4, d_tc).astype(np.float32),
             "W_dec": rng.normal(size=(d_tc, n - i, d)).astype(np.float32) / np.sqrt(d_tc)}
        save_file({f"W_enc_{i}": t["W_enc"], f"b_enc_{i}": t["b_enc"], f"b_dec_{i}": t["b_dec"],
                   f"threshold_{i}": t["threshold"]}, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": t["W_dec"]}, str(folder / f"W_dec_{i}.safetensors"))
        layers.append(t)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder",
                                                        "feature_input_hook": hooks[0],
                                                        "feature_output_hook": hooks[1]}))
    return layers


def test_cross_layer_transcoder_matches_format_maths(tmp_path):
    n, d = 3, D_IN
    files = write_clt(tmp_path / "clt", n, d)
    tcs = load_transcoders(tmp_path / "clt")
    assert [t.out_sites for t in tcs] == [tuple(f"blocks.{j}.hook_mlp_out" for j in range(i, n)) for i in range(n)]
    xs = [x_in(d, seed=i) for i in range(n)]                 # the read-site activations of each layer
    fs = []
    for tc, t, x in zip(tcs, files, xs):
        pre = x @ t["W_enc"].T + t["b_enc"]
        f_ref = pre * (pre > t["threshold"])                  # circuit-tracer JumpReLU: no relu
        f = np.asarray(tc.encode(jnp.asarray(x)))
        np.testing.assert_allclose(f, f_ref, atol=1e-5)
        fs.append(f_ref)
    for j in range(n):                                        # output layer j: sum over read layers i <= j
        want = sum(fs[i] @ files[i]["W_dec"][:, j - i] for i in range(j + 1)) + files[j]["b_dec"]
        got = sum(np.asarray(fs[i] @ tcs[i].decoder_rows(j - i)) for i in range(j + 1)) + np.asarray(tcs[j].b_dec)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_cross_layer_clamp_writes_every_later_layer(tmp_path):
    model = tiny_model("llama")
    n, d = model.config.n_layers, model.config.d_model
    files = write_clt(tmp_path / "clt", n, d, d_tc=12, seed=3)
    tcs = load_transcoders(tmp_path / "clt", model=model)
    tc = tcs[1]
    toks = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, size=(3, 6)))
    edit = ClampTranscoder.from_run(model, toks, tc, 4, 1.5)
    assert [e.site for e in edit.edits] == [f"blocks.{j}.hook_mlp_out" for j in range(1, n)]
    got = model.run(toks, edits=edit).logits
    f = np.asarray(tc.encode(model.run(toks, capture=(tc.site,)).cache[tc.site]))[..., 4]
    steers = [jfig.Steer(f"blocks.{j}.hook_mlp_out", jnp.asarray((1.5 - f)[..., None] * files[1]["W_dec"][4, j - 1]))
              for j in range(1, n)]
    want = model.run(toks, edits=steers).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    only_own = model.run(toks, edits=steers[:1]).logits
    assert np.abs(np.asarray(got) - np.asarray(only_own)).max() > 1e-4


def test_transcoder_target_forward_and_reverse_jacobians_agree(setup):
    model, sae, tc, toks = setup
    kw = dict(method="jacobian", targets={tc.site: range(tc.d_sae)}, inputs_per_source=3, progress=False)
    fwd = jfig.measure_effects(model, [sae, tc], {SRC: [0, 3]}, toks, mode="forward", **kw)
    rev = jfig.measure_effects(model, [sae, tc], {SRC: [0, 3]}, toks, mode="reverse", **kw)
    assert np.abs(fwd.mean).max() > 1e-4
    np.testing.assert_allclose(rev.mean, fwd.mean, atol=1e-4)
