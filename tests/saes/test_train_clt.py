"""Cross-layer transcoder training: a planted CLT teacher recovered (and better than per-layer
transcoders where it writes across layers), the loss against numpy, bit-exact resume, a CLT for a tiny
Llama's MLPs (held-out FVU, a measure_effects source, save_clt / load_transcoders round trip), and bad
input refused up front."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.errors import FormatError, JfigError, ShapeError, SiteError
from jfig.models.model import Model
from jfig.saes import save_clt
from jfig.saes.train import (CLTConfig, TranscoderConfig, capture_clt_pairs, clt_from_state, clt_loss, fit_clt,
                             fit_transcoder, init_clt_state, stream_clt_pairs, train_clt)
from jfig.testing import tiny_model

L, D_IN, D_OUT, N = 3, 12, 8, 8
READS = [f"blocks.{i}.hook_resid_mid" for i in range(L)]
WRITES = [f"blocks.{i}.hook_mlp_out" for i in range(L)]


def planted(active=2, batch=1024, bias=0.05, noise=0.02, seed=0):
    """A planted CLT and batch_at(step) -> (x [batch, L, D_IN], y [batch, L, D_OUT]).

    At each layer l, x_l is a sparse combination of `active` of N orthonormal directions (magnitudes
    in [0.5, 1.5]) plus noise, independent across layers; feature (l, i) is relu(x_l . enc_li - bias)
    and writes layer l and every later layer with one random unit row over those layers; b_dec random."""
    k = jax.random.split(jax.random.key(seed), 3)
    enc = jnp.linalg.qr(jax.random.normal(k[0], (L, D_IN, N)))[0]  # [L, D_IN, N] orthonormal columns
    dec = jax.random.normal(k[1], (L, N, L, D_OUT)) * jnp.triu(jnp.ones((L, L)))[:, None, :, None]
    dec = dec / jnp.linalg.norm(dec, axis=(-2, -1), keepdims=True)
    b_dec = 0.3 * jax.random.normal(k[2], (L, D_OUT))

    @jax.jit
    def make(step):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(jax.random.key(100 + seed), step), 3)
        index = jax.random.randint(k1, (batch, L, active), 0, N)
        magnitude = jax.random.uniform(k2, (batch, L, active), minval=0.5, maxval=1.5)
        dirs = jnp.take_along_axis(jnp.swapaxes(enc, 1, 2)[None], index[..., None], axis=2)  # [batch, L, a, D_IN]
        x = jnp.einsum("bla,blad->bld", magnitude, dirs) + noise * jax.random.normal(k3, (batch, L, D_IN))
        f = jax.nn.relu(jnp.einsum("bld,ldn->bln", x, enc) - bias)
        return x, jnp.einsum("bln,lnmo->bmo", f, dec) + b_dec

    return dec, lambda step: make(jnp.int32(step))


def fvu(y, y_hat):
    return float(jnp.sum((y - y_hat) ** 2) / jnp.sum((y - jnp.mean(y, axis=0)) ** 2))


def reconstruct(tcs, xs):
    """Every layer's output from the CLT: y_hat_m = sum_{l <= m} f_l W_dec_{l->m} + b_dec_m, with
    xs[l] the activations at tcs[l].site (encode applies the input norm)."""
    fs = [tc.encode(x) for tc, x in zip(tcs, xs)]
    out = []
    for m, tc in enumerate(tcs):
        y = tc.decode(fs[m])
        for l in range(m):
            y = y + fs[l] @ tcs[l].W_dec_later[:, m - l - 1]
        out.append(y)
    return jnp.stack(out, axis=1)


def full_rows(tc):
    """A CLT layer's decoder rows over every layer it writes, concatenated: [d_tc, n_out * d_out]."""
    W = tc.W_dec[:, None] if tc.W_dec_later is None else jnp.concatenate([tc.W_dec[:, None], tc.W_dec_later], 1)
    return W.reshape(W.shape[0], -1)


# ---------------------------------------------------------------------------------- planted teacher


def test_planted_clt_is_recovered_and_beats_per_layer_transcoders():
    dec, batch_at = planted()
    cfg = CLTConfig(d_sae=16, architecture="relu", l1_coeff=0.5, steps=400, batch_size=1024, lr=1e-2,
                    warmup_steps=20, dead_after_tokens=20_000, log_every=100)
    tcs, history = fit_clt(batch_at, READS, WRITES, D_IN, D_OUT, cfg, progress=False)
    x, y = batch_at(10_000)  # held out
    xs = [x[:, i] for i in range(L)]
    trained = fvu(y, reconstruct(tcs, xs))
    untrained = fvu(y, reconstruct(clt_from_state(init_clt_state(cfg, L, D_IN, D_OUT, *batch_at(0)), READS, WRITES),
                                   xs))
    # per-layer transcoders on the same data and schedule: layer m sees x_m only
    per_layer_err = per_layer_var = 0.0
    for m in range(L):
        tc, _ = fit_transcoder(lambda s, m=m: tuple(a[:, m] for a in batch_at(s)), D_IN, D_OUT, READS[m], WRITES[m],
                               TranscoderConfig(**{f: getattr(cfg, f) for f in CLTConfig.__dataclass_fields__}),
                               progress=False)
        per_layer_err += float(jnp.sum((y[:, m] - tc.forward(x[:, m])) ** 2))
        per_layer_var += float(jnp.sum((y[:, m] - jnp.mean(y[:, m], axis=0)) ** 2))
    per_layer = per_layer_err / per_layer_var
    cos = np.concatenate([np.asarray(jnp.max(dec[l, :, l:].reshape(N, -1) @ (
        full_rows(tc) / jnp.linalg.norm(full_rows(tc), axis=-1, keepdims=True)).T, axis=1)) for l, tc in enumerate(tcs)])
    share = float(np.mean(cos > 0.9))
    print(f"planted CLT (relu): held-out FVU {trained:.4f} (untrained {untrained:.3f}, per-layer transcoders "
          f"{per_layer:.3f}), best cosine mean {cos.mean():.3f} min {cos.min():.3f}, share > 0.9 {share:.2f}, "
          f"L0 {history['l0'][-1]:.2f} (planted {L * 2})")
    assert trained < 0.1 < 0.5 < untrained
    assert per_layer > 0.3 > 3 * trained  # the cross-layer writes matter
    assert share >= 0.8 and np.all(history["finite"])
    assert [tc.later_sites for tc in tcs] == [tuple(WRITES[1:]), tuple(WRITES[2:]), ()]
    assert [tc.W_dec_later.shape if tc.W_dec_later is not None else None for tc in tcs] == \
        [(16, 2, D_OUT), (16, 1, D_OUT), None]


def test_clt_loss_matches_numpy():
    """relu: mse over every write layer plus L1 weighted by each feature's norm over all the layers it
    writes; entries below the diagonal (a later layer writing an earlier one) are ignored."""
    rng = np.random.default_rng(0)
    cfg = CLTConfig(d_sae=5, architecture="relu", l1_coeff=0.3)
    params = {"W_enc": rng.normal(size=(L, 4, 5)), "b_enc": rng.normal(size=(L, 5)),
              "W_dec": rng.normal(size=(L, 5, L, 3)), "b_dec": rng.normal(size=(L, 3))}
    x, y = rng.normal(size=(7, L, 4)), rng.normal(size=(7, L, 3))
    loss, aux = clt_loss({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, jnp.asarray(x, jnp.float32),
                         jnp.asarray(y, jnp.float32), jnp.zeros((L, 5), bool), cfg)
    f = np.maximum(np.einsum("bld,ldf->blf", x, params["W_enc"]) + params["b_enc"], 0)
    y_hat = np.stack([params["b_dec"][m] + sum(f[:, l] @ params["W_dec"][l, :, m] for l in range(m + 1))
                      for m in range(L)], axis=1)
    norms = np.stack([np.sqrt(np.sum(params["W_dec"][l, :, l:] ** 2, axis=(-2, -1))) for l in range(L)])
    mse = np.mean(np.sum((y - y_hat) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(aux["mse"], mse, rtol=1e-4)
    np.testing.assert_allclose(aux["sparsity_loss"], np.mean(np.sum(f * norms, axis=(1, 2))), rtol=1e-4)
    np.testing.assert_allclose(loss, mse + 0.3 * np.mean(np.sum(f * norms, axis=(1, 2))), rtol=1e-4)
    np.testing.assert_allclose(aux["l0"], np.mean(np.sum(f > 0, axis=(1, 2))), rtol=1e-6)


# ---------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("architecture,extra", [("jumprelu", {"jumprelu_init_threshold": 0.3}),
                                                ("topk", {"k": 2, "dead_after_tokens": 64}), ("relu", {})])
def test_resume_after_kill_is_bit_exact(tmp_path, architecture, extra):
    _, batch_at = planted(batch=64)
    cfg = CLTConfig(d_sae=8, architecture=architecture, steps=10, batch_size=64, lr=1e-2, warmup_steps=2,
                    checkpoint_every=3, log_every=2, **extra)
    whole, h_whole = fit_clt(batch_at, READS, WRITES, D_IN, D_OUT, cfg, progress=False)
    folder = tmp_path / "run"
    fit_clt(batch_at, READS, WRITES, D_IN, D_OUT, cfg, checkpoint_dir=folder, progress=False, max_steps=7)  # killed
    resumed, h_resumed = fit_clt(batch_at, READS, WRITES, D_IN, D_OUT, cfg, checkpoint_dir=folder, progress=False)
    for a, b in zip(whole, resumed):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_dec_later", "threshold"):
            if getattr(a, name) is not None:
                np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), name)
    np.testing.assert_array_equal(h_whole["loss"], h_resumed["loss"])
    with pytest.raises(JfigError, match="checkpoint"):  # another run's folder
        fit_clt(batch_at, READS, WRITES, D_IN, D_OUT, CLTConfig(**{**cfg.__dict__, "lr": 2e-2}),
                checkpoint_dir=folder, progress=False)


# ---------------------------------------------------------------------------------- a tiny Llama's MLPs


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    return rng.integers(0, 64, size=(128, 17)), rng.integers(0, 64, size=(32, 17))


@pytest.fixture(scope="module")
def clt(model, tokens):
    """The docs example's CLT (so the example reuses its compiled steps)."""
    return train_clt(model, tokens[0], d_tc=32, architecture="jumprelu", steps=200, batch_size=256, lr=3e-3,
                     jumprelu_sparsity_coeff=0.1, progress=False)


def test_tiny_llama_clt_beats_the_mean_and_is_a_source(model, tokens, clt):
    tcs, toks = clt, tokens[1]
    assert [(tc.read_site, tc.write_site, tc.later_sites) for tc in tcs] == [
        ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", ("blocks.1.hook_mlp_out",)),
        ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", ())]
    assert all(tc.input_norm == "model" and tc.architecture == "jumprelu" for tc in tcs)
    sites = [tc.site for tc in tcs] + [s for tc in tcs for s in tc.out_sites[:1]]
    cache = model.run(toks, capture=tuple(sites)).cache
    xs = [cache[tc.site][:, 1:].reshape(-1, 16) for tc in tcs]
    y = jnp.stack([cache[tc.out_site][:, 1:].reshape(-1, 16) for tc in tcs], axis=1)
    held_out = fvu(y, reconstruct(tcs, xs))
    mean = fvu(y, jnp.broadcast_to(jnp.mean(y, axis=0), y.shape))
    # encode() sees what training saw: the captured pairs are the norm of hook_resid_mid
    x_pairs, y_pairs = capture_clt_pairs(model, toks)
    np.testing.assert_allclose(x_pairs[:, 1], tcs[1].prepare_input(xs[1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y_pairs, y)
    l0 = float(jnp.mean(sum(jnp.sum(tc.encode(x) != 0, axis=-1) for tc, x in zip(tcs, xs))))
    print(f"tiny llama CLT (2 layers, jumprelu), held out: FVU {held_out:.3f} (the mean's {mean:.3f}), L0 {l0:.1f}")
    assert held_out < 0.7 and mean == pytest.approx(1.0)
    f = tcs[0].encode(cache[tcs[0].site])
    busiest = np.argsort(-np.asarray(jnp.sum(f != 0, axis=(0, 1))))[:3].tolist()
    eff = jfig.measure_effects(model, tcs, {tcs[0].site: busiest}, toks, targets={tcs[1].site: range(tcs[1].d_sae)},
                               inputs_per_source=4, progress=False)
    assert np.all(np.isfinite(eff.mean)) and np.abs(eff.mean).max() > 0


def test_save_clt_round_trip(model, clt, tmp_path):
    folder = save_clt(clt, tmp_path / "clt")
    assert sorted(p.name for p in folder.iterdir()) == ["W_dec_0.safetensors", "W_dec_1.safetensors",
                                                        "W_enc_0.safetensors", "W_enc_1.safetensors", "config.yaml"]
    again = jfig.load_transcoders(folder, model=model)
    for a, b in zip(clt, again):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_dec_later", "threshold", "norm_w", "norm_b"):
            va, vb = getattr(a, name), getattr(b, name)
            assert (va is None) == (vb is None), name
            if va is not None:
                np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), name)
        for name in ("read_site", "write_site", "later_sites", "architecture", "k", "jump", "input_norm", "norm_kind"):
            assert getattr(a, name) == getattr(b, name), name
    save_clt(again, folder)  # replaces its own files
    with pytest.raises(FormatError, match="save_clt"):
        jfig.save_transcoder(clt[0], tmp_path / "one")
    with pytest.raises(FormatError, match="layers 0..0"):
        save_clt(clt[1:], tmp_path / "bad")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FormatError, match="other files"):
        save_clt(clt, tmp_path / "other")


def test_topk_stream_trains_from_the_model(model, tokens, tmp_path):
    """stream=True runs the model on each step's sequences (the batches capture_clt_pairs gives for them);
    a topk CLT saves and loads with its k."""
    batch_at, per_pass = stream_clt_pairs(model, tokens[0], batch_size=64, seed=0)
    x, y = batch_at(0)
    order = np.random.default_rng([0, 0]).permutation(128)[:4]
    x_ref, y_ref = capture_clt_pairs(model, tokens[0][order])
    assert per_pass == 32 and x.shape == (64, 2, 16)
    np.testing.assert_allclose(x, x_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    tcs = train_clt(model, tokens[0], d_tc=8, k=2, steps=3, batch_size=64, stream=True, progress=False)
    assert [tc.architecture for tc in tcs] == ["topk", "topk"] and all(tc.k == 2 for tc in tcs)
    assert all(bool(jnp.all(jnp.isfinite(tc.W_enc))) for tc in tcs)
    again = jfig.load_transcoders(save_clt(tcs, tmp_path / "topk"), model=model)
    assert [(tc.architecture, tc.k) for tc in again] == [("topk", 2), ("topk", 2)]
    np.testing.assert_array_equal(np.asarray(again[0].W_dec_later), np.asarray(tcs[0].W_dec_later))
    resid = jax.random.normal(jax.random.key(3), (20, 16))
    np.testing.assert_array_equal(again[1].encode(resid), tcs[1].encode(resid))


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_runs(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model ran before the input was checked")
    monkeypatch.setattr(Model, "run", boom)


def test_bad_input_is_refused_before_any_work(model, tokens, tmp_path, no_model_runs):
    toks = tokens[1]
    kw = dict(d_tc=8, steps=2, progress=False)
    with pytest.raises(JfigError, match="out of range: the model has 2 layers"):
        train_clt(model, toks, layers=[0, 2], **kw)
    with pytest.raises(JfigError, match="strictly increasing"):
        train_clt(model, toks, layers=[1, 0], **kw)
    with pytest.raises(JfigError, match="strictly increasing"):
        train_clt(model, toks, layers=[0, 0], **kw)
    with pytest.raises(JfigError, match="non-negative ints"):
        train_clt(model, toks, layers=[-1, 0], **kw)
    with pytest.raises(JfigError, match="layers is empty"):
        train_clt(model, toks, layers=[], **kw)
    with pytest.raises(JfigError, match="d_tc must be a positive int"):
        train_clt(model, toks, d_tc=0, progress=False)
    with pytest.raises(JfigError, match="topk. needs k"):
        train_clt(model, toks, d_tc=8, architecture="topk", progress=False)
    with pytest.raises(JfigError, match="unknown options"):
        train_clt(model, toks, d_tc=8, skip=True, progress=False)
    with pytest.raises(SiteError, match="does not come after"):
        train_clt(model, toks, read_hook="hook_mlp_out", write_hook="hook_resid_mid", **kw)
    x, y = np.ones((32, 2, 16), np.float32), np.ones((32, 2, 16), np.float32)
    x_bad = x.copy()
    x_bad[3, 1, 0] = np.nan
    with pytest.raises(JfigError, match="NaN"):
        train_clt(model, (x_bad, y), **kw)
    with pytest.raises(ShapeError, match="layers"):
        train_clt(model, (x, y), layers=[1], **kw)
    with pytest.raises(ShapeError, match="widths"):
        train_clt(model, (np.ones((32, 2, 12), np.float32), y), **kw)
    with pytest.raises(ShapeError, match=r"\[n, L, d\]"):
        train_clt(None, (np.ones((32, 16), np.float32), np.ones((32, 16), np.float32)), **kw)
    with pytest.raises(JfigError, match="needs steps="):
        train_clt(None, lambda s: (x, y), d_tc=8, progress=False)
    with pytest.raises(JfigError, match="stream=True applies to tokens"):
        train_clt(None, (x, y), stream=True, **kw)
    with pytest.raises(JfigError, match="needs a model"):
        train_clt(None, toks, layers=[0, 1], **kw)
    with pytest.raises(ShapeError, match=r"L=2, d_in=16"):  # a batch_at serving the wrong layer count
        fit_clt(lambda s: (x[:, :1], y[:, :1]), READS[:2], WRITES[:2], 16, 16, CLTConfig(d_sae=4, architecture="relu", steps=2),
                progress=False)


# ---------------------------------------------------------------------------------- docs


def test_docs_clt_example_runs(tmp_path, monkeypatch, clt):
    """The example in the Training section of docs/transcoders.md (a ```py block; the section's one
    ```python block is train_transcoder's) runs and gives the fixture's CLT."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "transcoders.md"
    section = docs.read_text().split("## Training\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```py\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], str(docs), "exec"), ns)
    assert len(ns["again"]) == 2 and all(tc.input_norm == "model" for tc in ns["again"])
    np.testing.assert_array_equal(np.asarray(ns["again"][0].W_dec_later), np.asarray(clt[0].W_dec_later))
    assert (tmp_path / "clt" / "config.yaml").exists()
