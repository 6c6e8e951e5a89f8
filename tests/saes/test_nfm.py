"""Neural factorization machines on an SAE's features: the pooling identity, planted products recovered
(and the matched-parameter secondary SAE explaining far less of them), exact resume, capture from a
model, the metrics against hand computations, files and errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfig.errors import FormatError, JfigError, ShapeError, SiteError
from jfig.saes import NFM, SAE, bi_interaction, load_nfm, nfm_metrics, nfm_params, sae_metrics, save_nfm
from jfig.saes.train import (NFMConfig, TrainConfig, fit, fit_nfm, matched_d_sae, nfm_from_state, nfm_train_step,
                             train_nfm, train_secondary_sae)
from jfig.saes.train.nfm import init_nfm_state, sae_params
from jfig.testing import tiny_model

SITE = "blocks.1.hook_resid_post"

# ---------------------------------------------------------------------------------- planted products

N, D, DL = 48, 32, 24          # features, target width, the linear part's coordinates (the rest: products)
PAIRS = [(0, 1), (2, 3), (4, 5)]
BATCH = 256


def planted_world():
    """A target ``y = f @ A + sum_p f_a f_b u_p + noise``: the linear part in the first DL coordinates,
    the planted products (3 pairs, each written along its own direction) in the rest, so each part's
    variance can be read apart. Planted features fire half the time (pairs co-occur on a quarter of the
    tokens); 8 of the other 42 fire per token on average, magnitudes uniform in [0.5, 1.5]."""
    key = jax.random.key(0)
    A = (jax.random.normal(key, (N, D)) * 0.3).at[:, DL:].set(0.0)
    U = jax.random.normal(jax.random.fold_in(key, 1), (len(PAIRS), D)).at[:, :DL].set(0.0)
    U = 1.5 * U / jnp.linalg.norm(U, axis=-1, keepdims=True)

    @jax.jit
    def make(step):
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(jax.random.key(7), step), 4)
        on = jnp.concatenate([jax.random.bernoulli(k1, 0.5, (BATCH, 6)),
                              jax.random.bernoulli(k2, 8 / (N - 6), (BATCH, N - 6))], axis=1)
        f = on * jax.random.uniform(k3, (BATCH, N), minval=0.5, maxval=1.5)
        prod = sum(f[:, a, None] * f[:, b, None] * U[p] for p, (a, b) in enumerate(PAIRS))
        y = f @ A + prod + 0.05 * jax.random.normal(k4, (BATCH, D))
        return f, y, prod

    return lambda step: make(jnp.int32(step))


@pytest.fixture(scope="module")
def planted_fit():
    make = planted_world()
    cfg = NFMConfig(k=4, hidden=0, steps=450, batch_size=BATCH, lr=2e-2, warmup_steps=20, log_every=50)
    nfm, history = fit_nfm(lambda s: make(s)[:2], N, D, SITE, cfg, progress=False)
    return make, nfm, history


def product_fvu(prediction, y, prod):
    """The product part's variance left unexplained: squared error in the product coordinates over the
    variance of the planted products there."""
    p = prod[:, DL:]
    return float(jnp.sum((y - prediction)[:, DL:] ** 2) / jnp.sum((p - p.mean(0)) ** 2))


def test_nfm_recovers_planted_products(planted_fit):
    make, nfm, history = planted_fit
    f, y, prod = make(10**6)                       # a held-out batch
    assert product_fvu(nfm(f), y, prod) < 0.05
    assert product_fvu(nfm.linear(f), y, prod) > 0.3  # the linear part alone cannot do it
    V, W = np.asarray(nfm.V), np.asarray(nfm.W_out)
    strength = (V ** 2).sum(0) * np.linalg.norm(W, axis=1)
    named = set()
    for k in np.argsort(-strength)[:len(PAIRS)]:   # the strongest dimensions name the planted pairs
        top_two = tuple(sorted(np.argsort(-np.abs(V[:, k]))[:2].tolist()))
        named.add(top_two)
        assert np.sort(np.abs(V[:, k]))[-3] < 0.1 * np.sort(np.abs(V[:, k]))[-2]
    assert named == set(PAIRS)


def test_matched_secondary_sae_explains_far_less_of_the_products(planted_fit):
    """The seed's baseline on the same target with as many parameters. It reads the target itself, so it
    could code a fixed-direction product as a latent; with k = 4 for ~8 larger linear terms and up to 3
    products per token it spends its latents on the linear part and leaves most product variance."""
    make, nfm, _ = planted_fit
    d_sae = matched_d_sae(nfm.n_params, D)
    cfg = TrainConfig(d_sae=d_sae, architecture="topk", k=4, steps=450, batch_size=BATCH, lr=2e-2, warmup_steps=20,
                      log_every=50)
    secondary, _ = fit(lambda s: make(s)[1], D, SITE, cfg, progress=False)
    assert abs(sae_params(secondary) - nfm.n_params) <= 2 * D + 1
    f, y, prod = make(10**6)
    nfm_left = product_fvu(nfm(f), y, prod)
    sae_left = product_fvu(secondary.reconstruct(y), y, prod)
    assert sae_left > 0.08 and sae_left > 4 * nfm_left


# ---------------------------------------------------------------------------------- the function


def test_bi_interaction_equals_explicit_pair_sum():
    with jax.enable_x64(True):
        f = jax.random.normal(jax.random.key(1), (5, 9), jnp.float64) * (jax.random.uniform(jax.random.key(2), (5, 9)) > 0.4)
        V = jax.random.normal(jax.random.key(3), (9, 4), jnp.float64)
        explicit = sum(f[:, i, None] * f[:, j, None] * V[i] * V[j] for i in range(9) for j in range(i + 1, 9))
        np.testing.assert_allclose(bi_interaction(f, V), explicit, rtol=1e-12, atol=1e-12)
        single = jnp.zeros((9,), jnp.float64).at[4].set(3.0)   # one active feature: no pair, no interaction
        np.testing.assert_allclose(bi_interaction(single, V), 0.0, atol=1e-12)


def test_parts_sum_to_output_and_mask_ablates_dimensions():
    nfm = NFM.init(jax.random.key(0), 10, 6, 3, SITE, hidden=5)
    nfm = NFM(W_lin=jax.random.normal(jax.random.key(1), (10, 6)), b=jnp.ones(6), V=nfm.V,
              W_out=jax.random.normal(jax.random.key(2), (5, 6)), W_hidden=nfm.W_hidden, site=SITE)
    f = jax.nn.relu(jax.random.normal(jax.random.key(4), (7, 10)))
    lin, inter = nfm.parts(f)
    np.testing.assert_allclose(nfm(f), lin + inter, rtol=1e-6)
    np.testing.assert_allclose(lin, f @ nfm.W_lin + nfm.b, rtol=1e-6)
    np.testing.assert_allclose(nfm.interaction(f, jnp.zeros(3)), 0.0)
    z = nfm.pooled(f).at[:, 1].set(0.0)
    np.testing.assert_allclose(nfm.interaction(f, jnp.array([1.0, 0.0, 1.0])), nfm.project(z), rtol=1e-6)
    assert nfm.n_params == nfm_params(10, 6, 3, 5) == 10 * 6 + 6 + 10 * 3 + 3 * 5 + 5 * 6
    x_hat = jnp.ones((7, 6))
    np.testing.assert_allclose(nfm.corrected(x_hat, f), x_hat + nfm(f), rtol=1e-6)


def test_scales_fold_back_exactly():
    """Training on scaled data and folding the scales back gives the same function on raw data."""
    rng = np.random.default_rng(0)
    f = rng.uniform(0, 30, (64, 12)) * (rng.uniform(size=(64, 12)) < 0.3)
    y = rng.normal(0, 50, (64, 5))
    state = init_nfm_state(NFMConfig(k=3, hidden=4), 12, 5, f, y)
    params = {k: jax.random.normal(jax.random.fold_in(jax.random.key(9), i), v.shape)
              for i, (k, v) in enumerate(state.params.items())}
    state = state.__class__(params=params, opt_state=state.opt_state, step=state.step, scale_in=state.scale_in,
                            scale_out=state.scale_out, cfg=state.cfg)
    from_state = nfm_from_state(state, SITE)
    scaled = NFM(W_lin=params["W_lin"], b=params["b"], V=params["V"], W_out=params["W_out"], W_hidden=params["W_hidden"],
                 site=SITE)
    expected = scaled(jnp.asarray(f, jnp.float32) * state.scale_in) / state.scale_out
    np.testing.assert_allclose(from_state(jnp.asarray(f, jnp.float32)), expected, rtol=2e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- training runs


def small_pairs(rows=192, n=20, d=8, seed=0):
    rng = np.random.default_rng(seed)
    f = (rng.uniform(0.5, 1.5, (rows, n)) * (rng.uniform(size=(rows, n)) < 0.3)).astype(np.float32)
    y = (f @ rng.normal(size=(n, d)) + f[:, :1] * f[:, 1:2] * rng.normal(size=(1, d))).astype(np.float32)
    return f, y


def small_cfg(**changes):
    return NFMConfig(**{**dict(k=3, steps=12, batch_size=32, lr=1e-2, warmup_steps=2, log_every=3), **changes})


def test_exact_resume_from_checkpoint(tmp_path):
    f, y = small_pairs()
    whole, h_whole = fit_nfm((f, y), 20, 8, SITE, small_cfg(), progress=False)
    folder = tmp_path / "ckpt"
    fit_nfm((f, y), 20, 8, SITE, small_cfg(checkpoint_every=4), checkpoint_dir=folder, max_steps=7, progress=False)
    resumed, h_resumed = fit_nfm((f, y), 20, 8, SITE, small_cfg(checkpoint_every=4), checkpoint_dir=folder,
                                 progress=False)
    for name in ("W_lin", "b", "V", "W_out", "W_hidden"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))
    np.testing.assert_array_equal(h_resumed["loss"], h_whole["loss"])
    assert h_whole["fvu"][-1] < h_whole["fvu"][0]
    with pytest.raises(JfigError, match="different TrainConfig"):  # a checkpoint of another run is refused
        fit_nfm((f, y), 20, 8, SITE, small_cfg(lr=5e-3), checkpoint_dir=folder, progress=False)


def test_one_compiled_step(count_traces):
    f, y = small_pairs()
    state = init_nfm_state(small_cfg(), 20, 8, f, y)
    state, _ = nfm_train_step(state, f[:32], y[:32])
    other = init_nfm_state(small_cfg(seed=5), 20, 8, f, y)
    with count_traces() as traces:                 # another step, another seed: the compiled step is reused
        state, _ = nfm_train_step(state, f[32:64], y[32:64])
        nfm_train_step(other, f[:32], y[:32])
    assert traces.count == 0


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", n_layers=2, d_model=16)
    sae = SAE.init_random(jax.random.key(3), 16, 24, SITE, architecture="topk", k=4)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (24, 9), 1, 64), np.int32)
    return model, sae, tokens


def test_streamed_and_captured_runs_agree_and_resume(tiny, tmp_path):
    model, sae, tokens = tiny
    kw = dict(k=3, steps=6, batch_size=32, lr=1e-2, warmup_steps=1, log_every=2, progress=False)
    captured = train_nfm(model, sae, tokens, **kw)
    streamed = train_nfm(model, sae, tokens, stream=True, **kw)
    np.testing.assert_allclose(streamed.V, captured.V, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.W_lin, captured.W_lin, rtol=1e-5, atol=1e-6)
    assert (captured.site, captured.target, captured.n_features, captured.d_out) == (SITE, "error", 24, 16)
    folder = tmp_path / "run"
    first = train_nfm(model, sae, tokens, checkpoint_dir=folder, checkpoint_every=2, **{**kw, "steps": 6})
    again = train_nfm(model, sae, tokens, checkpoint_dir=folder, checkpoint_every=2, **{**kw, "steps": 6})
    np.testing.assert_array_equal(again.V, first.V)   # a finished run resumes to itself
    with pytest.raises(JfigError, match="resume=False"):
        train_nfm(model, sae, tokens, checkpoint_dir=folder, resume=False, **kw)
    other = SAE.init_random(jax.random.key(8), 16, 24, SITE, architecture="topk", k=4)
    with pytest.raises(JfigError, match="sae"):       # the checkpoint belongs to another SAE
        train_nfm(model, other, tokens, checkpoint_dir=folder, checkpoint_every=2, **kw)


def test_nfm_metrics_match_hand_computation(tiny):
    model, sae, tokens = tiny
    nfm = NFM.init(jax.random.key(1), 24, 16, 3, SITE, hidden=0)
    nfm = NFM(W_lin=0.05 * jax.random.normal(jax.random.key(2), (24, 16)), b=0.1 * jnp.ones(16), V=nfm.V,
              W_out=0.3 * jax.random.normal(jax.random.key(5), (3, 16)), site=SITE)
    secondary = SAE.init_random(jax.random.key(6), 16, 10, SITE, architecture="topk", k=2)
    m = nfm_metrics(model, sae, nfm, tokens, secondary=secondary, batch_size=7)
    x = model.run(jnp.asarray(tokens), capture=(SITE,), stop_at=SITE, logits=False).cache[SITE][:, 1:].reshape(-1, 16)
    f = sae.encode(x)
    x_hat = sae.reconstruct(x)
    e = x - x_hat
    total = float(jnp.sum((x - x.mean(0)) ** 2))
    err = lambda r: float(jnp.sum((x - r) ** 2))  # noqa: E731
    reference = sae_metrics(model, sae, tokens)
    np.testing.assert_allclose(m["fvu_sae"], err(x_hat) / total, rtol=1e-4)
    np.testing.assert_allclose(m["fvu_sae"], reference["fvu"], rtol=1e-4)
    np.testing.assert_allclose(m["error_reduction_nfm"], 1 - err(x_hat + nfm(f)) / err(x_hat), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["error_reduction_secondary"], 1 - err(x_hat + secondary.reconstruct(e)) / err(x_hat),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["explained_linear"],
                               1 - float(jnp.sum((e - nfm.linear(f)) ** 2)) / float(jnp.sum((e - e.mean(0)) ** 2)),
                               rtol=1e-4, atol=1e-6)
    inter = nfm.interaction(f)
    np.testing.assert_allclose(m["var_interaction"], float(jnp.sum((inter - inter.mean(0)) ** 2)) / x.shape[0],
                               rtol=1e-4)
    np.testing.assert_allclose(m["ce_sae"], reference["ce_spliced"], rtol=1e-5)
    assert m["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)
    zero = NFM(W_lin=jnp.zeros((24, 16)), b=jnp.zeros(16), V=nfm.V, W_out=jnp.zeros((3, 16)), site=SITE)
    z = nfm_metrics(model, sae, zero, tokens, secondary=secondary, batch_size=7)  # adds nothing, changes nothing
    assert z["error_reduction_nfm"] == pytest.approx(0.0, abs=1e-6)
    assert z["ce_nfm"] == pytest.approx(z["ce_sae"], abs=1e-5)


def test_secondary_sae_matches_parameters_and_reads_the_error(tiny):
    model, sae, tokens = tiny
    nfm = NFM.init(jax.random.key(1), 24, 16, 3, SITE)
    secondary = train_secondary_sae(model, sae, tokens, nfm=nfm, k=2, steps=4, batch_size=32, lr=1e-2,
                                    warmup_steps=1, progress=False)
    assert secondary.d_sae == matched_d_sae(nfm.n_params, 16)
    assert abs(sae_params(secondary) - nfm.n_params) <= 33
    assert secondary.site == SITE and secondary.meta["reads"] == "error"


# ---------------------------------------------------------------------------------- files and errors


def test_save_load_roundtrip_and_corrupt_files(tmp_path):
    nfm = NFM.init(jax.random.key(0), 10, 6, 3, SITE, hidden=4, target="next", metadata={"note": "x"})
    path = save_nfm(nfm, tmp_path / "nfm")
    back = load_nfm(path)
    for name in ("W_lin", "b", "V", "W_out", "W_hidden"):
        np.testing.assert_array_equal(getattr(back, name), getattr(nfm, name))
    assert (back.site, back.target, back.meta) == (SITE, "next", {"note": "x"})
    flat = save_nfm(NFM.init(jax.random.key(0), 10, 6, 3, SITE, hidden=0), tmp_path / "flat")
    assert load_nfm(flat).W_hidden is None
    (path / "nfm.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError, match="cannot read"):
        load_nfm(path)
    cfg = json.loads((flat / "nfm.json").read_text())
    (flat / "nfm.json").write_text(json.dumps({**cfg, "k": 7}))
    with pytest.raises(FormatError, match="records"):
        load_nfm(flat)
    with pytest.raises(FormatError, match="no nfm.json"):
        load_nfm(tmp_path / "missing")


def test_errors_before_any_work(tiny):
    model, sae, tokens = tiny
    other_site = SAE.init_random(jax.random.key(0), 24, 24, SITE, architecture="topk", k=4)
    with pytest.raises(ShapeError, match="another site"):
        train_nfm(model, other_site, tokens, k=3, steps=2, progress=False)
    with pytest.raises(SiteError, match="unknown site"):
        train_nfm(model, SAE.init_random(jax.random.key(0), 16, 24, "blocks.9.hook_resid_post", architecture="topk",
                                         k=4), tokens, k=3, progress=False)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(JfigError, match="embedding size"):
            train_nfm(model, sae, tokens, k=bad, progress=False)
    with pytest.raises(JfigError, match="target 'residual' is unknown"):
        train_nfm(model, sae, tokens, k=3, target="residual", progress=False)
    with pytest.raises(JfigError, match="unknown options"):
        train_nfm(model, sae, tokens, k=3, l1_coeff=1.0, progress=False)
    with pytest.raises(ShapeError, match="n, seq > 0|non-empty"):
        train_nfm(model, sae, np.zeros((0, 9), np.int32), k=3, progress=False)
    with pytest.raises(JfigError, match="empty"):
        train_nfm(model, sae, [], k=3, progress=False)
    f, y = small_pairs()
    with pytest.raises(JfigError, match="NaN"):
        fit_nfm((f, np.where(np.arange(8) == 3, np.nan, y)), 20, 8, SITE, small_cfg(), progress=False)
    with pytest.raises(JfigError, match="NaN"):
        fit_nfm(lambda s: (f[:32], np.full((32, 8), np.inf, np.float32)), 20, 8, SITE, small_cfg(), progress=False)
    with pytest.raises(ShapeError, match="n=20"):
        fit_nfm((f[:, :10], y), 20, 8, SITE, small_cfg(), progress=False)
    wrong = NFM.init(jax.random.key(0), 30, 16, 3, SITE)
    with pytest.raises(ShapeError, match="trained on this SAE"):
        nfm_metrics(model, sae, wrong, tokens)
    with pytest.raises(JfigError, match="exactly one"):
        train_secondary_sae(model, sae, tokens, progress=False)
