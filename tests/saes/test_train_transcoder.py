"""Transcoder training: a planted teacher recovered, bit-exact resume, the loss formulas, a transcoder for
a tiny Llama's MLP (metrics, splice, measure_effects, save and load), and bad input refused up front."""

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.edits import Patch
from jfig.errors import FormatError, JfigError, ShapeError, SiteError
from jfig.models.model import Model
from jfig.saes import SAE, Transcoder, load_transcoders, save_transcoder, transcoder_metrics, transcoder_pair_metrics
from jfig.saes.train import (TrainConfig, TranscoderConfig, capture_pairs, fit, fit_transcoder, init_transcoder_state,
                             stream_pairs, train_transcoder, transcoder_from_state, transcoder_loss,
                             transcoder_train_step)
from jfig.testing import tiny_model

READ, WRITE = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "transcoders.md"


def planted(n_latents, d_in, d_out, *, active=3, batch=1024, noise=0.02, bias=0.05, skip=0.0, seed=0):
    """A planted transcoder and batch_at(step) -> (x, y) with y = planted(x) exactly.

    x is a sparse combination of `active` of `n_latents` orthonormal input directions (magnitudes
    uniform in [0.5, 1.5]) plus Gaussian noise; the planted encoder is those directions with bias
    -`bias`, so its relu codes are the sparse combination up to the noise that leaks through; its
    decoder rows are random unit vectors in d_out (more rows than dimensions), b_dec random, and
    `skip` scales a dense linear skip term."""
    k = jax.random.split(jax.random.key(seed), 4)
    enc = jnp.linalg.qr(jax.random.normal(k[0], (d_in, n_latents)))[0]  # [d_in, n] orthonormal columns
    dec = jax.random.normal(k[1], (n_latents, d_out))
    dec = dec / jnp.linalg.norm(dec, axis=-1, keepdims=True)
    b_dec = 0.3 * jax.random.normal(k[2], (d_out,))
    W_skip = skip * jax.random.normal(k[3], (d_in, d_out)) / np.sqrt(d_in)

    @jax.jit
    def make(step):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(jax.random.key(100 + seed), step), 3)
        index = jax.random.randint(k1, (batch, active), 0, n_latents)
        magnitude = jax.random.uniform(k2, (batch, active), minval=0.5, maxval=1.5)
        x = jnp.einsum("ba,bad->bd", magnitude, enc.T[index]) + noise * jax.random.normal(k3, (batch, d_in))
        f = jax.nn.relu(x @ enc - bias)
        return x, f @ dec + b_dec + x @ W_skip

    return dec, lambda step: make(jnp.int32(step))


def fvu(y, y_hat):
    return float(jnp.sum((y - y_hat) ** 2) / jnp.sum((y - jnp.mean(y, axis=0)) ** 2))


def best_cosines(dec, tc):
    """Per planted decoder row, the best cosine with a trained decoder row."""
    W = tc.W_dec / jnp.linalg.norm(tc.W_dec, axis=-1, keepdims=True)
    return np.asarray(jnp.max(dec @ W.T, axis=1))


def small_cfg(architecture, **changes):
    """The small run most tests share (d_in 8 -> d_out 6, batches of 32), so they share compiled steps."""
    base = dict(d_sae=24, architecture=architecture, k=3 if architecture == "topk" else None, steps=24,
                batch_size=32, lr=3e-3, warmup_steps=4, dead_after_tokens=64, jumprelu_init_threshold=0.3,
                jumprelu_bandwidth=0.1, log_every=5)
    return TranscoderConfig(**{**base, **changes})


# ---------------------------------------------------------------------------------- planted teacher


@pytest.mark.parametrize("architecture,extra,max_fvu,min_share", [
    ("topk", {"k": 3}, 0.05, 0.8),
    ("relu", {"l1_coeff": 1.0}, 0.15, 0.8),
    ("jumprelu", {"jumprelu_sparsity_coeff": 1.0}, 0.1, 0.6),
])
def test_planted_teacher_is_recovered(architecture, extra, max_fvu, min_share):
    dec, batch_at = planted(48, 64, 24)
    cfg = TranscoderConfig(d_sae=96, architecture=architecture, steps=500, lr=1e-2, warmup_steps=20,
                           dead_after_tokens=20_000, log_every=100, **extra)
    tc, history = fit_transcoder(batch_at, 64, 24, "blocks.0.hook_resid_mid", WRITE, cfg, progress=False)
    x, y = batch_at(10_000)  # held out
    untrained = transcoder_from_state(init_transcoder_state(cfg, 64, 24, *batch_at(0)), tc.read_site, tc.write_site)
    cos = best_cosines(dec, tc)
    share = float(np.mean(cos > 0.9))
    print(f"{architecture}: FVU {fvu(y, tc.forward(x)):.4f} (untrained {fvu(y, untrained.forward(x)):.3f}), "
          f"best cosine mean {cos.mean():.3f}, share > 0.9 {share:.2f}, L0 {history['l0'][-1]:.2f}")
    assert fvu(y, tc.forward(x)) < max_fvu < 0.5 < fvu(y, untrained.forward(x))
    assert share >= min_share
    assert (tc.architecture, tc.d_in, tc.d_tc, tc.d_out) == (architecture, 64, 96, 24)
    assert history["l0"][-1] < 8 and np.all(history["finite"])
    metrics = transcoder_pair_metrics(tc, x, y)
    np.testing.assert_allclose(metrics["fvu"], fvu(y, tc.forward(x)), rtol=1e-4)
    assert metrics["l0"] < 8 and metrics["n_tokens"] == x.shape[0]


def test_skip_connection_learns_the_dense_part():
    """With a dense linear term in the teacher, a skip transcoder explains it and a plain one cannot."""
    _, batch_at = planted(16, 16, 12, skip=1.0, batch=256)
    x, y = batch_at(10_000)
    out = {}
    for skip in (False, True):
        cfg = TranscoderConfig(d_sae=32, architecture="topk", k=3, steps=150, lr=1e-2, warmup_steps=20,
                               log_every=100, skip=skip)
        tc, _ = fit_transcoder(batch_at, 16, 12, "blocks.0.hook_resid_mid", WRITE, cfg, progress=False)
        assert (tc.W_skip is not None) == skip
        out[skip] = fvu(y, tc.forward(x))
    print(f"teacher with a skip term: FVU {out[False]:.4f} without skip, {out[True]:.4f} with")
    assert out[True] < 0.05 and out[True] < out[False] / 3


@pytest.mark.parametrize("architecture,skip", [("topk", False), ("jumprelu", True), ("relu", False)])
def test_inference_transcoder_equals_training_forward(architecture, skip):
    """The returned transcoder folds both scales, exp(log_threshold) and W_skip in: on raw x it
    computes the training output of x * s_in, divided by s_out, with the same latents."""
    _, batch_at = planted(6, 8, 6, batch=32)
    cfg = small_cfg(architecture, skip=skip)
    scaled = lambda b: (b[0] * 3.0, b[1] * 0.2)  # noqa: E731
    state = init_transcoder_state(cfg, 8, 6, *scaled(batch_at(0)))
    for step in range(5):
        state, _ = transcoder_train_step(state, *scaled(batch_at(step)))
    x, _ = scaled(batch_at(99))
    tc = transcoder_from_state(state, "blocks.0.hook_resid_mid", WRITE)
    p, s_in, s_out = state.params, state.scale, state.scale_out
    assert float(s_in) != 1.0 and float(s_out) != 1.0
    pre = (x * s_in) @ p["W_enc"] + p["b_enc"]
    if architecture == "topk":  # the k largest raw values, as Transcoder.activation keeps them
        values, index = jax.lax.top_k(pre, 3)
        f = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], index].set(values)
    elif architecture == "jumprelu":
        f = jnp.where(pre > jnp.exp(p["log_threshold"]), jax.nn.relu(pre), 0.0)
    else:
        f = jax.nn.relu(pre)
    want = f @ p["W_dec"] + p["b_dec"] + ((x * s_in) @ p["W_skip"] if skip else 0.0)
    np.testing.assert_allclose(tc.encode(x), f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tc.forward(x), want / s_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(p["W_dec"], axis=-1), 1.0, rtol=1e-6)
    assert tc.meta["train_steps"] == 5 and tc.meta["train_config"]["skip"] is skip
    assert tc.meta["hook_name_out"] == WRITE


# ---------------------------------------------------------------------------------- the loss


def test_topk_loss_with_auxk_and_skip_matches_numpy():
    cfg = TranscoderConfig(d_sae=12, k=2, aux_k=3, aux_coeff=0.25, skip=True)
    rng = np.random.default_rng(1)
    p = {"W_enc": rng.normal(size=(5, 12)), "b_enc": rng.normal(size=12) * 0.1, "W_dec": rng.normal(size=(12, 4)),
         "b_dec": rng.normal(size=4) * 0.1, "W_skip": rng.normal(size=(5, 4)) * 0.3}
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 4))
    dead = np.zeros(12, bool)
    dead[[1, 4, 5, 9, 10]] = True
    args = ({k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, jnp.asarray(x, jnp.float32),
            jnp.asarray(y, jnp.float32))
    loss, aux = transcoder_loss(*args, jnp.asarray(dead), cfg)

    def top(pre, k, allowed, relu):
        pre = np.where(allowed, pre, -np.inf)
        keep = np.argsort(-pre, axis=-1)[:, :k]
        f = np.zeros_like(pre)
        values = np.take_along_axis(pre, keep, -1)
        np.put_along_axis(f, keep, np.maximum(values, 0) if relu else values, -1)
        return f

    pre = x @ p["W_enc"] + p["b_enc"]
    y_hat = top(pre, 2, np.ones(12, bool), relu=False) @ p["W_dec"] + p["b_dec"] + x @ p["W_skip"]
    e = y - y_hat
    e_hat = top(pre, 3, dead, relu=True) @ p["W_dec"]
    auxk = np.sum((e - e_hat) ** 2) / np.sum((e - e.mean(0)) ** 2)
    mse = np.mean(np.sum(e ** 2, -1))
    np.testing.assert_allclose(aux["sparsity_loss"], auxk, rtol=1e-5)
    np.testing.assert_allclose(loss, mse + 0.25 * auxk, rtol=1e-5)
    np.testing.assert_allclose(aux["fvu"], np.sum(e ** 2) / np.sum((y - y.mean(0)) ** 2), rtol=1e-5)
    _, no_dead = transcoder_loss(*args, jnp.zeros(12, bool), cfg)
    assert float(no_dead["sparsity_loss"]) == 0.0


def test_relu_and_jumprelu_losses_match_numpy():
    rng = np.random.default_rng(2)
    p = {"W_enc": rng.normal(size=(4, 6)), "b_enc": np.zeros(6), "W_dec": rng.normal(size=(6, 3)), "b_dec": np.ones(3),
         "log_threshold": np.log(np.full(6, 0.4))}
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    pre = x @ p["W_enc"]
    cfg = TranscoderConfig(d_sae=6, architecture="relu", l1_coeff=0.5)
    loss, aux = transcoder_loss({k: v for k, v in arrays.items() if k != "log_threshold"}, jnp.asarray(x, jnp.float32),
                                jnp.asarray(y, jnp.float32), jnp.zeros(6, bool), cfg)
    f = np.maximum(pre, 0)
    l1 = np.mean(f @ np.linalg.norm(p["W_dec"], axis=-1))
    np.testing.assert_allclose(aux["sparsity_loss"], l1, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(np.sum((y - f @ p["W_dec"] - 1) ** 2, -1)) + 0.5 * l1, rtol=1e-5)
    cfg = TranscoderConfig(d_sae=6, architecture="jumprelu", jumprelu_sparsity_coeff=0.3)
    loss, aux = transcoder_loss(arrays, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.zeros(6, bool), cfg)
    f = np.where(pre > 0.4, pre, 0)
    l0 = np.mean(np.sum(pre > 0.4, -1))
    np.testing.assert_allclose(aux["l0"], l0, rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean(np.sum((y - f @ p["W_dec"] - 1) ** 2, -1)) + 0.3 * l0, rtol=1e-5)


# ---------------------------------------------------------------------------------- resume


def _sources(kind, batch_at, n):
    if kind == "callable":
        return batch_at
    if kind == "array":  # 80 rows, batches of 32: epochs wrap
        xs, ys = zip(*(batch_at(s) for s in range(3)))
        return jnp.concatenate(xs)[:80], jnp.concatenate(ys)[:80]
    return (batch_at(s) for s in range(n))


@pytest.mark.parametrize("kind,architecture,skip", [("callable", "topk", False), ("array", "jumprelu", True),
                                                    ("iterable", "relu", False)])
def test_resume_after_kill_is_bit_exact(tmp_path, kind, architecture, skip):
    n = 24
    _, batch_at = planted(6, 8, 6, batch=32)
    cfg = small_cfg(architecture, checkpoint_every=n // 2, skip=skip)
    run = dict(d_in=8, d_out=6, read_site="blocks.0.hook_resid_mid", write_site=WRITE, cfg=cfg, progress=False)
    full, full_history = fit_transcoder(_sources(kind, batch_at, n), **run)

    def kill(step, state, metrics):
        if step == n // 2 + 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_transcoder(_sources(kind, batch_at, n), **run, checkpoint_dir=tmp_path, callback=kill)
    assert [p.name for p in tmp_path.iterdir()] == [f"step_{n // 2:09d}"]
    resumed, history = fit_transcoder(_sources(kind, batch_at, n), **run, checkpoint_dir=tmp_path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"):
        if getattr(full, name) is not None:
            np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name), err_msg=name)
    for key in full_history:
        np.testing.assert_array_equal(history[key], full_history[key], err_msg=key)
    assert history["step"].tolist() == list(range(n))
    assert resumed.meta == full.meta
    if architecture == "topk":  # the AuxK branch ran on both sides of the checkpoint
        assert full_history["sparsity_loss"][n // 2:].max() > 0


def test_resume_refuses_another_run(tmp_path):
    _, batch_at = planted(6, 8, 6, batch=32)
    cfg = small_cfg("topk", steps=4)
    run = dict(read_site="blocks.0.hook_resid_mid", write_site=WRITE, checkpoint_dir=tmp_path, progress=False)
    fit_transcoder(batch_at, 8, 6, cfg=cfg, **run)
    with pytest.raises(JfigError, match="skip"):
        fit_transcoder(batch_at, 8, 6, cfg=dataclasses.replace(cfg, skip=True), **run)
    with pytest.raises(JfigError, match="d_out"):
        fit_transcoder(lambda s: (batch_at(s)[0], batch_at(s)[1][:, :5]), 8, 5, cfg=cfg, **run)
    with pytest.raises(JfigError, match="different TrainConfig"):  # an SAE run cannot resume a transcoder's
        fit(lambda s: batch_at(s)[0], 8, "blocks.0.hook_resid_mid", TrainConfig(d_sae=24, k=3, steps=4),
            checkpoint_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------------- a tiny Llama's MLP


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokens():
    """Training tokens (the docs example's) and held-out tokens."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 64, size=(128, 17)), rng.integers(0, 64, size=(32, 17))


@pytest.fixture(scope="module")
def trained(model, tokens):
    """The docs example's transcoder (so that example reuses these compiled steps)."""
    return train_transcoder(model, tokens[0], layer=0, d_tc=64, architecture="topk", k=8, steps=200, batch_size=256,
                            lr=3e-3, progress=False)


def test_layer0_mlp_transcoder_beats_the_mean(model, tokens, trained):
    tc = trained
    assert (tc.read_site, tc.write_site, tc.site, tc.out_site) == (READ, WRITE, "blocks.0.hook_resid_mid", WRITE)
    assert tc.input_norm == "model" and tc.architecture == "topk" and tc.k == 8
    x, y = capture_pairs(model, tokens[1], READ, WRITE)
    mean_fvu = fvu(y, jnp.broadcast_to(jnp.mean(y, axis=0), y.shape))  # the best constant: 1 by definition
    metrics = transcoder_metrics(model, tc, tokens[1])
    print(f"tiny llama layer 0 MLP, held out: FVU {metrics['fvu']:.3f} (the held-out mean's {mean_fvu:.3f}), "
          f"L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.2f}, CE clean {metrics['ce_clean']:.4f} "
          f"spliced {metrics['ce_spliced']:.4f} zero {metrics['ce_zero']:.4f}")
    assert metrics["fvu"] < 0.6 and mean_fvu == pytest.approx(1.0)
    assert metrics["l0"] <= 8 and 0 <= metrics["dead_fraction"] < 1
    assert all(np.isfinite(metrics[k]) for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_loss_recovered"))
    # the pairs are what encode() sees: hook_resid_mid divided by its root mean square, before ln2's weight,
    # as TransformerLens places ln2.hook_normalized; mlp.hook_in is the whole norm, weight included
    resid, _ = capture_pairs(model, tokens[1], "blocks.0.hook_resid_mid", WRITE)  # a jfig site: taken as it is
    normalised = resid / jnp.sqrt(jnp.mean(resid ** 2, axis=-1, keepdims=True) + model.config.norm_eps)
    np.testing.assert_allclose(x, normalised, rtol=1e-5, atol=1e-5)
    x_mlp_in, _ = capture_pairs(model, tokens[1], "blocks.0.mlp.hook_in", WRITE)
    w = model.params["blocks"]["ln2_w"][0]
    np.testing.assert_allclose(x_mlp_in, normalised * (model.config.norm_offset + w), rtol=1e-5, atol=1e-5)
    assert not np.allclose(x_mlp_in, x, atol=1e-3)  # the weight matters
    np.testing.assert_allclose(tc.forward(resid), tc.activation(x @ tc.W_enc + tc.b_enc) @ tc.W_dec + tc.b_dec,
                               rtol=1e-4, atol=1e-5)
    pair = transcoder_pair_metrics(tc, x, y)
    for key in ("fvu", "l0", "dead_fraction", "n_tokens"):
        np.testing.assert_allclose(pair[key], metrics[key], rtol=1e-4, err_msg=key)


def test_splice_is_a_patch_of_the_transcoder_output(model, tokens, trained):
    """ce_spliced is the loss with the MLP's output replaced by the transcoder's forward of resid_mid
    (position 0 left clean); ce_zero with it set to zero."""
    tc, toks = trained, tokens[1]
    metrics = transcoder_metrics(model, tc, toks)
    later = jnp.arange(1, toks.shape[1])
    resid, _ = capture_pairs(model, toks, "blocks.0.hook_resid_mid", WRITE, drop_first=False)
    output = tc.forward(resid).reshape(*toks.shape, 16)

    def nll(values):
        logp = jax.nn.log_softmax(model.run(toks, edits=(Patch(WRITE, values, later),)).logits[:, :-1], axis=-1)
        return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(toks)[:, 1:, None], axis=-1)))

    np.testing.assert_allclose(metrics["ce_spliced"], nll(output), rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_zero"], nll(jnp.zeros_like(output)), rtol=1e-5)
    assert metrics["ce_spliced"] != metrics["ce_clean"]


def test_trained_transcoder_is_a_measure_effects_source_and_target(model, tokens, trained):
    tc = trained
    sae0 = SAE.init_random(jax.random.key(2), 16, 24, "blocks.0.hook_resid_pre")
    sae1 = SAE.init_random(jax.random.key(1), 16, 32, "blocks.1.hook_resid_post")
    toks = tokens[1]
    f = tc.encode(model.run(toks, capture=(tc.site,)).cache[tc.site])
    busiest = np.argsort(-np.asarray(jnp.sum(f != 0, axis=(0, 1))))[:3].tolist()
    eff = jfig.measure_effects(model, [sae0, tc, sae1], {sae0.site: [0, 1], tc.site: busiest}, toks,
                               targets={tc.site: range(tc.d_sae), sae1.site: range(sae1.d_sae)},
                               inputs_per_source=4, progress=False)
    on_tc = eff.mean[:2, :tc.d_sae]  # SAE sources at resid_pre -> transcoder targets
    from_tc = eff.mean[2:, tc.d_sae:]  # transcoder sources -> SAE targets at blocks.1
    assert np.all(np.isfinite(on_tc)) and np.abs(on_tc).max() > 0
    assert np.all(np.isfinite(from_tc)) and np.abs(from_tc).max() > 0


def test_stream_trains_and_resumes_exactly(model, tokens, tmp_path):
    """stream=True runs the model per step; a run of the same stream interrupted and resumed from its
    checkpoints ends with the parameters of train_transcoder's uninterrupted run."""
    tc = train_transcoder(model, tokens[0], layer=0, d_tc=32, k=4, batch_size=128, lr=3e-3, warmup_steps=4,
                          progress=False, stream=True)  # one pass: 128 sequences, 8 (128 tokens) per step
    assert tc.meta["train_steps"] == 16
    batch_at, per_pass = stream_pairs(model, tokens[0], READ, WRITE, batch_size=128)
    assert per_pass == 16
    sequences = np.random.default_rng([0, 1]).permutation(128)[24:32]  # step 19: the second pass's fourth batch
    for got, want in zip(batch_at(19), capture_pairs(model, tokens[0][sequences], READ, WRITE)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    cfg = TranscoderConfig(d_sae=32, architecture="topk", k=4, steps=16, batch_size=128, lr=3e-3, warmup_steps=4,
                           checkpoint_every=8)
    run = dict(d_in=16, d_out=16, read_site=READ, write_site=WRITE, cfg=cfg, model=model, progress=False,
               checkpoint_dir=tmp_path)

    def kill(step, state, metrics):
        if step == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_transcoder(batch_at, **run, callback=kill)
    resumed, _ = fit_transcoder(batch_at, **run)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(tc, name), err_msg=name)


# ---------------------------------------------------------------------------------- save / load


def _trained_like(architecture, skip, model):
    """A transcoder as training returns it (folded scales, positive thresholds, metadata), with random
    b_enc and W_skip so that every array matters."""
    _, batch_at = planted(12, 16, 16, batch=32)
    cfg = small_cfg(architecture, skip=skip, jumprelu_init_threshold=0.05)
    tc = transcoder_from_state(init_transcoder_state(cfg, 16, 16, *batch_at(0)), READ, WRITE, model=model)
    keys = jax.random.split(jax.random.key(3), 2)
    return dataclasses.replace(tc, b_enc=0.3 * jax.random.normal(keys[0], (24,)),
                               W_skip=jax.random.normal(keys[1], (16, 16)) / 4 if skip else None)


@pytest.mark.parametrize("architecture,skip,files", [
    ("relu", False, {"cfg.json", "sae_weights.safetensors"}),
    ("jumprelu", True, {"cfg.json", "sae_weights.safetensors"}),
    ("topk", True, {"config.yaml", "transcoder.safetensors"}),
])
def test_save_and_load_round_trip(tmp_path, model, architecture, skip, files):
    tc = _trained_like(architecture, skip, model)
    assert tc.input_norm == "model"
    folder = save_transcoder(tc, tmp_path / "tc")
    assert {p.name for p in folder.iterdir()} == files
    [loaded] = load_transcoders(folder, model=model)
    assert (loaded.read_site, loaded.write_site, loaded.architecture, loaded.k, loaded.input_norm) == (
        READ, WRITE, architecture, tc.k, "model")
    resid = jax.random.normal(jax.random.key(5), (3, 7, 16)) * 2.0
    np.testing.assert_array_equal(loaded.encode(resid), tc.encode(resid))
    np.testing.assert_allclose(loaded.forward(resid), tc.forward(resid), rtol=1e-6, atol=1e-6)
    if "cfg.json" in files:  # SAELens's cfg carries jfig's metadata, training config included
        arch = {"relu": "transcoder", "jumprelu": "jumprelu_skip_transcoder"}[architecture]
        assert loaded.meta["architecture"] == arch
        assert loaded.meta["train_config"] == tc.meta["train_config"]
        assert loaded.meta["hook_name_out"] == WRITE
    [unattached] = load_transcoders(folder)
    assert unattached.input_norm == "unset"
    save_transcoder(loaded, folder)  # a transcoder folder may be replaced
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FormatError, match="other files"):
        save_transcoder(tc, folder)


def test_save_refuses_what_saelens_cannot_hold(tmp_path):
    topk = Transcoder.init_random(jax.random.key(0), 6, 10, "blocks.1.hook_resid_mid", WRITE.replace("0", "1"),
                                  architecture="topk", k=3)
    with pytest.raises(FormatError, match="no TopK transcoder"):
        save_transcoder(topk, tmp_path / "a", format="saelens")
    ct = dataclasses.replace(Transcoder.init_random(jax.random.key(1), 6, 10, "blocks.1.hook_resid_mid",
                                                    "blocks.1.hook_mlp_out", architecture="jumprelu"),
                             jump="circuit_tracer", threshold=jnp.linspace(-0.5, 0.5, 10))
    folder = save_transcoder(ct, tmp_path / "b")  # auto: circuit-tracer's convention is kept
    [loaded] = load_transcoders(folder)
    x = jax.random.normal(jax.random.key(2), (5, 6))
    np.testing.assert_allclose(loaded.forward(x), ct.forward(x), rtol=1e-6, atol=1e-6)
    clt = dataclasses.replace(topk, W_dec_later=jnp.zeros((10, 1, 6)), later_sites=("blocks.2.hook_mlp_out",))
    with pytest.raises(FormatError, match="cross-layer"):
        save_transcoder(clt, tmp_path / "c")


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_runs(monkeypatch):
    """Any model run fails the test: bad input must be refused before any work."""
    def boom(*args, **kwargs):
        raise AssertionError("the model ran before the input was checked")
    monkeypatch.setattr(Model, "run", boom)


def test_bad_input_is_refused_before_any_work(model, tokens, tmp_path, no_model_runs):
    toks = tokens[1]
    kw = dict(d_tc=16, k=2, steps=2, progress=False)
    with pytest.raises(SiteError, match="does not come after read_site"):
        train_transcoder(model, toks, "blocks.1.ln2.hook_normalized", "blocks.0.hook_mlp_out", **kw)
    with pytest.raises(SiteError, match="does not come after read_site"):
        train_transcoder(model, toks, "blocks.0.hook_mlp_out", "blocks.0.hook_resid_mid", **kw)
    with pytest.raises(SiteError, match="unknown site"):
        train_transcoder(model, toks, layer=5, **kw)
    with pytest.raises(SiteError, match="not a site jfig can read"):
        train_transcoder(model, toks, "blocks.0.ln3.hook_normalized", WRITE, **kw)
    with pytest.raises(SiteError, match="head axes"):
        train_transcoder(model, toks, "blocks.0.attn.hook_z", WRITE, **kw)
    with pytest.raises(JfigError, match="needs read_site and write_site"):
        train_transcoder(model, toks, **kw)
    with pytest.raises(JfigError, match="d_tc must be a positive int"):
        train_transcoder(model, toks, layer=0, d_tc=0, k=None, progress=False)
    with pytest.raises(JfigError, match="topk. needs k"):
        train_transcoder(model, toks, layer=0, d_tc=8, architecture="topk", progress=False)
    with pytest.raises(JfigError, match="exceeds d_sae"):
        train_transcoder(model, toks, layer=0, d_tc=8, k=9, progress=False)
    with pytest.raises(JfigError, match="unknown options"):
        train_transcoder(model, toks, layer=0, d_tc=8, k=2, stpes=3, progress=False)
    x, y = np.ones((32, 16), np.float32), np.ones((32, 16), np.float32)
    x_bad, y_bad = x.copy(), y.copy()
    x_bad[3, 1], y_bad[0, 0] = np.nan, np.inf
    with pytest.raises(JfigError, match="x_in .*NaN"):
        train_transcoder(model, (x_bad, y), layer=0, **kw)
    with pytest.raises(JfigError, match="y .*NaN"):
        train_transcoder(None, (np.ones((32, 16), np.float32), y_bad), layer=0, **kw)
    with pytest.raises(ShapeError, match="width 12 but blocks.0.hook_mlp_out of the model has width 16"):
        train_transcoder(model, (np.ones((32, 16), np.float32), np.ones((32, 12), np.float32)), layer=0, **kw)
    with pytest.raises(ShapeError, match="as many rows"):
        train_transcoder(None, (np.ones((32, 16), np.float32), np.ones((30, 16), np.float32)), layer=0, **kw)
    with pytest.raises(JfigError, match="needs steps="):
        train_transcoder(None, lambda s: (x, y), layer=0, d_tc=8, k=2, progress=False)
    with pytest.raises(JfigError, match="stream=True applies to tokens"):
        train_transcoder(None, (x, y), layer=0, stream=True, **kw)
    with pytest.raises(JfigError, match="needs a model"):
        train_transcoder(None, toks, layer=0, **kw)


def test_bad_batches_and_refused_folders(tmp_path):
    _, batch_at = planted(6, 8, 6, batch=32)
    cfg = small_cfg("topk", steps=4, log_every=1)
    run = dict(read_site="blocks.0.hook_resid_mid", write_site=WRITE, cfg=cfg, progress=False)
    good = batch_at(0)
    with pytest.raises(JfigError, match="batch 2 .*NaN"):
        fit_transcoder(lambda s: (good[0], good[1].at[0, 0].set(jnp.nan)) if s == 2 else good, 8, 6, **run)
    with pytest.raises(ShapeError, match=r"outputs of activation batch 1 .*outputs \[\.\.\., d_out=6\]"):
        fit_transcoder(lambda s: good if s != 1 else (good[0], good[1][:, :5]), 8, 6, **run)
    with pytest.raises(ShapeError, match="pair 32 input rows with 31 output rows"):
        fit_transcoder(lambda s: (good[0], good[1][:31]), 8, 6, **run)
    with pytest.raises(ShapeError, match="trains on pairs"):
        fit_transcoder(lambda s: good[0], 8, 6, **run)
    with pytest.raises(JfigError, match="ran out"):
        fit_transcoder(iter([good, good]), 8, 6, **run)
    fit_transcoder(batch_at, 8, 6, **run, checkpoint_dir=tmp_path)
    with pytest.raises(JfigError, match="resume=False"):
        train_transcoder(None, batch_at, "blocks.0.hook_resid_mid", WRITE, d_tc=24, k=3, steps=4, batch_size=32,
                         checkpoint_dir=tmp_path, resume=False, progress=False)


# ---------------------------------------------------------------------------------- docs


def test_docs_training_example_runs(tmp_path, monkeypatch):
    section = DOCS.read_text().split("## Training\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], str(DOCS), "exec"), ns)
    assert isinstance(ns["again"], Transcoder) and ns["again"].input_norm == "model"
    assert ns["metrics"]["fvu"] < 0.6 and (tmp_path / "transcoder_layer0" / "config.yaml").exists()
