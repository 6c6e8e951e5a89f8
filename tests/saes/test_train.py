"""SAE training: planted-dictionary recovery, bit-exact resume, the loss formulas, and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import jfig
from jfig.errors import FormatError, JfigError, ShapeError
from jfig.models.config import llama_config
from jfig.models.forward import init_params
from jfig.saes import SAE
from jfig.saes.train import (TrainConfig, TrainState, fit, geometric_median, heaviside_step, init_train_state,
                             jumprelu, make_schedule, sae_from_state, sae_loss, train_sae, train_step)

SITE = "blocks.1.hook_resid_post"


def planted(n_dirs, d, *, active=4, batch=1024, seed=0):
    """Unit directions [n_dirs, d] and batch_at(step): each row a sum of `active` random directions
    with magnitudes uniform in [0.5, 1.5]."""
    dirs = jax.random.normal(jax.random.key(100 + seed), (n_dirs, d))
    dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)

    @jax.jit
    def make(step):
        k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(200 + seed), step))
        index = jax.random.randint(k1, (batch, active), 0, n_dirs)
        magnitude = jax.random.uniform(k2, (batch, active), minval=0.5, maxval=1.5)
        return jnp.einsum("ba,bad->bd", magnitude, dirs[index])

    return dirs, lambda step: make(jnp.int32(step))


def small_cfg(architecture, **changes):
    """The small run most tests share (d_in 8, batches of 32), so they share compiled steps."""
    base = dict(d_sae=40, architecture=architecture, k=3 if architecture == "topk" else None, steps=24,
                batch_size=32, lr=3e-3, warmup_steps=4, dead_after_tokens=64, jumprelu_init_threshold=0.3,
                jumprelu_bandwidth=0.1, log_every=5)
    return TrainConfig(**{**base, **changes})


def recovery(dirs, sae):
    """Mean over true directions of the best cosine with a decoder row."""
    W = sae.W_dec / jnp.linalg.norm(sae.W_dec, axis=-1, keepdims=True)
    return float(jnp.mean(jnp.max(dirs @ W.T, axis=1)))


# ---------------------------------------------------------------------------------- planted recovery


def test_topk_recovers_planted_dictionary():
    dirs, batch_at = planted(512, 64)
    cfg = TrainConfig(d_sae=1024, architecture="topk", k=4, steps=500, lr=5e-3, warmup_steps=20,
                      dead_after_tokens=20_000, log_every=50)
    sae, history = fit(batch_at, 64, SITE, cfg, progress=False)
    score = recovery(dirs, sae)
    print(f"topk 512 dirs in 64 dims, d_sae 1024, k 4, 500 steps: mean max cos {score:.4f}")
    assert score >= 0.95
    assert sae.architecture == "topk" and sae.k == 4 and sae.site == SITE
    assert np.all(history["l0"] <= 4) and history["explained_variance"][-1] > 0.8
    norms = jnp.linalg.norm(sae.W_dec, axis=-1)  # unit rows in training, 1 / scale once folded
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)


@pytest.mark.parametrize("architecture,extra", [
    ("jumprelu", {"jumprelu_sparsity_coeff": 1.0}),
    ("relu", {"l1_coeff": 2.0}),
])
def test_jumprelu_and_relu_recover_planted_dictionary(architecture, extra):
    dirs, batch_at = planted(64, 32)
    cfg = TrainConfig(d_sae=128, architecture=architecture, steps=1000, lr=1e-2, warmup_steps=20,
                      log_every=100, **extra)
    sae, history = fit(batch_at, 32, SITE, cfg, progress=False)
    score = recovery(dirs, sae)
    print(f"{architecture} 64 dirs in 32 dims, d_sae 128, 1000 steps: mean max cos {score:.4f}, "
          f"L0 {history['l0'][-1]:.2f}")
    assert score >= 0.8
    assert sae.architecture == architecture
    if architecture == "jumprelu":
        assert sae.threshold is not None and bool(jnp.all(sae.threshold > 0))


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "relu"])
def test_inference_sae_equals_training_forward(architecture):
    """The returned SAE folds the input scale and exp(log_threshold) in: on raw x it computes the
    training reconstruction of x * scale, divided by scale."""
    _, batch_at = planted(16, 8, batch=32)
    cfg = small_cfg(architecture)
    state = init_train_state(cfg, 8, batch_at(0) * 3.0)
    for step in range(5):
        state, _ = train_step(state, batch_at(step) * 3.0)
    x = batch_at(99) * 3.0
    sae = sae_from_state(state, SITE)
    p, s = state.params, state.scale
    pre = (x * s - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if architecture == "topk":
        f = SAE.activation(sae, pre)
    elif architecture == "jumprelu":
        f = jnp.where(pre > jnp.exp(p["log_threshold"]), jax.nn.relu(pre), 0.0)
    else:
        f = jax.nn.relu(pre)
    want = (f @ p["W_dec"] + p["b_dec"]) / s
    np.testing.assert_allclose(sae.reconstruct(x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sae.encode(x), f, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- resume


def _sources(kind, batch_at, n):
    if kind == "callable":
        return batch_at
    if kind == "array":
        return jnp.concatenate([batch_at(s) for s in range(3)])[:80]  # 80 rows, batches of 32: epochs wrap
    return (batch_at(s) for s in range(n))


@pytest.mark.parametrize("kind,architecture", [("callable", "topk"), ("array", "jumprelu"), ("iterable", "relu")])
def test_resume_after_kill_is_bit_exact(tmp_path, kind, architecture):
    n = 24
    _, batch_at = planted(32, 8, batch=32)
    cfg = small_cfg(architecture, checkpoint_every=n // 2)
    full, full_history = fit(_sources(kind, batch_at, n), 8, SITE, cfg, progress=False)

    def kill(step, state, metrics):
        if step == n // 2 + 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_sources(kind, batch_at, n), 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False, callback=kill)
    assert [p.name for p in tmp_path.iterdir()] == [f"step_{n // 2:09d}"]
    resumed, history = fit(_sources(kind, batch_at, n), 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        if getattr(full, name) is not None:
            np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name), err_msg=name)
    for key in full_history:
        np.testing.assert_array_equal(history[key], full_history[key], err_msg=key)
    assert history["step"].tolist() == list(range(n))
    if architecture == "topk":  # the AuxK branch ran on both sides of the checkpoint
        assert full_history["sparsity_loss"][n // 2:].max() > 0


def test_max_steps_stops_and_resumes(tmp_path):
    _, batch_at = planted(32, 8, batch=32)
    cfg = small_cfg("topk", keep_checkpoints=1)
    full, _ = fit(batch_at, 8, SITE, cfg, progress=False)
    part, history = fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False, max_steps=17)
    assert len(history["step"]) == 17 and part.meta["train_steps"] == 17
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000017"]
    resumed, _ = fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(resumed.W_dec, full.W_dec)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000024"]
    again, _ = fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)  # finished: no steps run
    np.testing.assert_array_equal(again.W_enc, full.W_enc)


def test_resume_refuses_a_different_config(tmp_path):
    _, batch_at = planted(32, 8, batch=32)
    cfg = small_cfg("topk", steps=4)
    fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(JfigError, match="lr"):
        fit(batch_at, 8, SITE, dataclasses.replace(cfg, lr=1e-3), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(JfigError, match="site"):
        fit(batch_at, 8, "blocks.0.hook_resid_post", cfg, checkpoint_dir=tmp_path, progress=False)
    fit(batch_at, 8, SITE, dataclasses.replace(cfg, log_every=3), checkpoint_dir=tmp_path, progress=False)


def test_corrupt_checkpoint_is_a_format_error_naming_the_file(tmp_path):
    _, batch_at = planted(32, 8, batch=32)
    cfg = small_cfg("topk", steps=4)
    fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "state.eqx"]
    state_file = folder / "state.eqx"
    blob = state_file.read_bytes()
    state_file.write_bytes(blob[:len(blob) // 2])  # truncated
    with pytest.raises(FormatError, match=r"state\.eqx is truncated or corrupt"):
        fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)
    state_file.write_bytes(blob)
    meta = folder / "meta.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(FormatError, match=r"meta\.json is truncated or corrupt"):
        fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "step_000000002.npz").write_bytes(b"old")
    with pytest.raises(FormatError, match=r"step_000000002\.npz is in the old \.npz format"):
        fit(batch_at, 8, SITE, cfg, checkpoint_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------------- formulas


def test_schedule_warms_up_and_decays_to_zero():
    for decay in ("cosine", "linear"):
        lr = make_schedule(TrainConfig(d_sae=4, k=1, steps=100, lr=1.0, warmup_steps=10, decay=decay))
        assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
        assert float(lr(55)) == pytest.approx(0.5, abs=1e-6) and float(lr(100)) == pytest.approx(0.0, abs=1e-7)
    lr = make_schedule(TrainConfig(d_sae=4, k=1, steps=100, lr=1.0, warmup_steps=0, decay="constant"))
    assert float(lr(0)) == float(lr(99)) == 1.0


def test_geometric_median_against_scipy():
    x = np.random.default_rng(0).normal(size=(50, 3))
    x[:5] += 40.0  # outliers pull the mean, not the median
    want = scipy.optimize.minimize(lambda y: np.linalg.norm(x - y, axis=1).sum(), x.mean(0), tol=1e-10).x
    np.testing.assert_allclose(geometric_median(jnp.asarray(x, jnp.float32), iters=64), want, atol=2e-3)


def test_jumprelu_pseudo_derivatives():
    z = jnp.array([[0.1, 0.48, 0.52, 0.9], [0.45, 0.5, 0.56, -1.0]])
    theta = jnp.array([0.5, 0.5, 0.5, 0.5])
    eps = 0.1  # window (theta - eps/2, theta + eps/2) = (0.45, 0.55), open
    in_window = np.array([[0, 1, 1, 0], [0, 1, 0, 0]], np.float32)
    np.testing.assert_array_equal(jumprelu(z, theta, eps), np.where(z > theta, z, 0))
    dz, dtheta = jax.grad(lambda z, t: jnp.sum(jumprelu(z, t, eps)), argnums=(0, 1))(z, theta)
    np.testing.assert_array_equal(dz, (z > theta).astype(np.float32))
    np.testing.assert_allclose(dtheta, -(0.5 / eps) * in_window.sum(0), rtol=1e-6)
    dz, dtheta = jax.grad(lambda z, t: jnp.sum(heaviside_step(z, t, eps)), argnums=(0, 1))(z, theta)
    np.testing.assert_array_equal(dz, 0.0)
    np.testing.assert_allclose(dtheta, -(1 / eps) * in_window.sum(0), rtol=1e-6)


def test_training_encodes_with_the_sae_encoder():
    """The loss's encoder is the SAE's: the straight-through gate gives the inference values, and
    the sparse top-k scattered back is the dense activation."""
    pre = jax.random.normal(jax.random.key(3), (6, 10))
    sae = SAE.init_random(jax.random.key(4), 5, 10, SITE, "jumprelu")
    sae = dataclasses.replace(sae, threshold=jnp.full((10,), 0.3))
    np.testing.assert_array_equal(sae.activation(pre, jump=lambda z, t: jumprelu(z, t, 0.1)), sae.activation(pre))
    sae = SAE.init_random(jax.random.key(4), 5, 10, SITE, "topk", k=3)
    values, index = sae.topk(pre)
    assert values.shape == index.shape == (6, 3) and bool(jnp.all(values >= 0))
    dense = jnp.zeros((6, 10)).at[jnp.arange(6)[:, None], index].set(values)
    np.testing.assert_array_equal(dense, sae.activation(pre))


def test_topk_loss_with_auxk_matches_numpy():
    cfg = TrainConfig(d_sae=12, k=2, aux_k=3, aux_coeff=0.25)
    rng = np.random.default_rng(1)
    p = {"W_enc": rng.normal(size=(5, 12)), "b_enc": rng.normal(size=12) * 0.1, "W_dec": rng.normal(size=(12, 5)),
         "b_dec": rng.normal(size=5) * 0.1}
    x = rng.normal(size=(7, 5))
    dead = np.zeros(12, bool)
    dead[[1, 4, 5, 9, 10]] = True
    loss, aux = sae_loss({k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, jnp.asarray(x, jnp.float32),
                      jnp.asarray(dead), cfg)

    def top(pre, k, allowed):
        pre = np.where(allowed, pre, -np.inf)
        keep = np.argsort(-pre, axis=-1)[:, :k]
        f = np.zeros_like(pre)
        np.put_along_axis(f, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
        return f

    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    x_hat = top(pre, 2, np.ones(12, bool)) @ p["W_dec"] + p["b_dec"]
    e = x - x_hat
    e_hat = top(pre, 3, dead) @ p["W_dec"]
    auxk = np.sum((e - e_hat) ** 2) / np.sum((e - e.mean(0)) ** 2)
    mse = np.mean(np.sum(e ** 2, -1))
    np.testing.assert_allclose(aux["sparsity_loss"], auxk, rtol=1e-5)
    np.testing.assert_allclose(loss, mse + 0.25 * auxk, rtol=1e-5)
    _, no_dead = sae_loss({k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, jnp.asarray(x, jnp.float32),
                       jnp.zeros(12, bool), cfg)
    assert float(no_dead["sparsity_loss"]) == 0.0


def test_relu_l1_is_weighted_by_decoder_norms():
    cfg = TrainConfig(d_sae=6, architecture="relu", l1_coeff=0.5)
    rng = np.random.default_rng(2)
    p = {"W_enc": rng.normal(size=(4, 6)), "b_enc": np.zeros(6), "W_dec": rng.normal(size=(6, 4)), "b_dec": np.zeros(4)}
    x = rng.normal(size=(3, 4))
    loss, aux = sae_loss({k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, jnp.asarray(x, jnp.float32),
                      jnp.zeros(6, bool), cfg)
    f = np.maximum(x @ p["W_enc"], 0)
    l1 = np.mean(f @ np.linalg.norm(p["W_dec"], axis=-1))
    np.testing.assert_allclose(aux["sparsity_loss"], l1, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(np.sum((x - f @ p["W_dec"]) ** 2, -1)) + 0.5 * l1, rtol=1e-5)


def test_step_keeps_decoder_rows_unit_and_counts_dead_latents():
    _, batch_at = planted(16, 8, batch=32)
    state = init_train_state(small_cfg("topk"), 8, batch_at(0))
    assert isinstance(state, TrainState)
    for step in range(3):
        state, metrics = train_step(state, batch_at(step))
    np.testing.assert_allclose(jnp.linalg.norm(state.params["W_dec"], axis=-1), 1.0, rtol=1e-6)
    assert int(state.step) == 3 and bool(metrics["finite"])
    never = state.since_fired == 96  # latents silent for all three 32-token batches
    np.testing.assert_allclose(metrics["dead_fraction"], float(jnp.mean(never)))
    assert set(np.unique(np.asarray(state.since_fired))) <= {0, 32, 64, 96}


# ---------------------------------------------------------------------------------- train_sae


@pytest.fixture(scope="module")
def model():
    cfg = llama_config(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=50,
                       max_seq_len=32)
    return jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2))


def test_train_sae_from_tokens_and_from_activations(model):
    tokens = np.random.default_rng(0).integers(0, 50, size=(24, 9))
    sae, metrics = train_sae(model, tokens, SITE, d_sae=32, k=4, steps=30, batch_size=64, lr=3e-3, progress=False)
    assert sae.site == SITE and sae.d_in == 16 and sae.architecture == "topk"
    for key in ("fvu", "l0", "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero",
                "ce_loss_recovered"):
        assert np.isfinite(metrics[key]), key
    assert metrics["l0"] <= 4 and metrics["n_tokens"] == 24 * 8

    acts = model.run(tokens, capture=(SITE,)).cache[SITE][:, 1:].reshape(-1, 16)
    sae2, metrics2 = train_sae(model, acts, SITE, d_sae=32, k=4, steps=30, batch_size=64, lr=3e-3, progress=False)
    np.testing.assert_array_equal(sae2.W_dec, sae.W_dec)  # same activations, same run
    assert "ce_clean" not in metrics2 and metrics2["n_tokens"] == acts.shape[0]


def test_train_sae_at_hook_z_reshapes(model):
    tokens = np.random.default_rng(1).integers(0, 50, size=(8, 6))
    site = "blocks.0.attn.hook_z"
    sae, metrics = train_sae(model, tokens, site, d_sae=32, k=4, steps=3, batch_size=64, lr=3e-3, progress=False)
    assert sae.reshape_hook_z and sae.hook_z_shape == (4, 4) and np.isfinite(metrics["ce_spliced"])


# ---------------------------------------------------------------------------------- errors


def test_errors(model):
    with pytest.raises(JfigError, match="exceeds d_sae"):
        TrainConfig(d_sae=8, k=9)
    with pytest.raises(JfigError, match="needs k"):
        TrainConfig(d_sae=8, architecture="topk")
    with pytest.raises(JfigError, match="applies to architecture .topk. only"):
        TrainConfig(d_sae=8, architecture="relu", k=2)
    with pytest.raises(JfigError, match="architecture"):
        TrainConfig(d_sae=8, architecture="gated")
    cfg = small_cfg("topk", steps=4, log_every=1)
    good = jnp.ones((32, 8))
    with pytest.raises(JfigError, match="NaN"):
        fit(good.at[3, 1].set(jnp.nan), 8, SITE, cfg, progress=False)
    with pytest.raises(JfigError, match="batch 2 .*NaN"):  # found when initialising
        fit(lambda s: good.at[0, 0].set(jnp.nan) if s == 2 else good, 8, SITE, cfg, progress=False)
    with pytest.raises(JfigError, match="batch 2 .*NaN"):  # found during training
        fit(lambda s: good.at[0, 0].set(jnp.inf) if s == 2 else good, 8, SITE,
            dataclasses.replace(cfg, init_batches=1), progress=False)
    with pytest.raises(ShapeError, match="d_in=8"):
        fit(jnp.ones((32, 5)), 8, SITE, cfg, progress=False)
    with pytest.raises(ShapeError, match="batch 1 .*d_in=8"):
        fit(lambda s: good if s != 1 else jnp.ones((32, 6)), 8, SITE, cfg, progress=False)
    with pytest.raises(JfigError, match="ran out"):
        fit(iter([good, good]), 8, SITE, cfg, progress=False)
    with pytest.raises(ShapeError, match="width 12 but site .* width 16"):
        train_sae(model, np.ones((32, 12), np.float32), SITE, d_sae=8, k=2, steps=1, progress=False)
    with pytest.raises(JfigError, match="unknown options"):
        train_sae(None, np.ones((32, 12), np.float32), SITE, d_sae=8, k=2, step=1)
    with pytest.raises(JfigError, match="exceeds d_sae"):
        train_sae(None, np.ones((32, 12), np.float32), SITE, d_sae=8, k=20, progress=False)
    with pytest.raises(JfigError, match="applies to architecture .topk. only"):
        train_sae(None, np.ones((32, 12), np.float32), SITE, d_sae=8, k=2, architecture="relu", progress=False)
