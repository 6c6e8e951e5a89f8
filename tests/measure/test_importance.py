"""Attribution importance: the first-order (tangent-line) estimate of every token's Δnll under the
ablation of a feature, absolute value per token — against float64 central differences, against the
exact ablation as the ablation shrinks, and against the exact ablation's ranking on a tiny Llama."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

import jfig
from jfig.edits import Edit
from jfig.measure import ablation_effects, attribution_by_site, attribution_effects
from jfig.models.config import llama_config
from jfig.models.forward import forward, init_params

SITE = "h1"
D, V = 12, 23


class Shift(Edit):
    """x + delta in x's dtype (Steer rounds its direction to float32)."""

    site_name: str = eqx.field(static=True)
    delta: jax.Array

    @property
    def site(self):
        return self.site_name

    def apply(self, x, pos_axis=1):
        return x + self.delta.astype(x.dtype)


def causal_lm(params, tokens, hook, *, linear=False):
    """A tiny causal LM as a plain JAX function: sites "h0", "h1"; the suffix after "h1" mixes
    positions (running mean) and is nonlinear unless `linear` (then the logits are linear in h1)."""
    x = hook("h0", params["embed"][tokens])
    h = hook("h1", x + jnp.tanh(x @ params["w0"]))
    mean = jnp.cumsum(h, axis=1) / jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
    y = h + mean @ params["w1"] if linear else h + jnp.tanh(2.0 * mean @ params["w1"]) * jnp.tanh(h)
    return y @ params["unembed"]


def function_model(linear=False, dtype=jnp.float64):
    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(V, D)), "w0": rng.normal(size=(D, D)) / np.sqrt(D),
              "w1": rng.normal(size=(D, D)) / np.sqrt(D), "unembed": 2 * rng.normal(size=(D, V)) / np.sqrt(D)}
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    return jfig.Model.from_function(lambda p, t, hook: causal_lm(p, t, hook, linear=linear), params,
                                    sites=("h0", "h1"), vocab_size=V, site_widths={"h0": D, "h1": D})


def token_nll(model, tokens, edits=()):
    """-log p(next token) [n, s-1], float64 on the host."""
    logits = model.run(tokens, edits=edits).logits
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)[..., 0], np.float64)


def central_difference(model, sae, tokens, i, eps=1e-5):
    """(per-token dΔnll_t/dε [n, s-1] at ε=0 for h -> h - ε f_i W_dec[i] where i is active, n_active)."""
    acts = model.run(tokens, capture=(sae.site,)).cache[sae.site]
    f = sae.encode(acts)[..., i]
    delta = -f[..., None] * sae.W_dec[i]
    up = token_nll(model, tokens, (Shift(sae.site, eps * delta),))
    down = token_nll(model, tokens, (Shift(sae.site, -eps * delta),))
    return (up - down) / (2 * eps), int((np.asarray(f) > 0).sum())


def active_features(model, sae, tokens, n):
    acts = model.run(tokens, capture=(sae.site,)).cache[sae.site]
    fires = (np.asarray(sae.encode(acts)) > 0).sum((0, 1))
    return [int(i) for i in np.flatnonzero(fires)[:n]]


@pytest.fixture(scope="module")
def f64_case():
    """Attribution of 5 features on a nonlinear float64 function model (5 sequences in batches of 2,
    features in padded chunks of 3) and the central-difference reference per token."""
    with jax.enable_x64(True):
        model = function_model()
        sae = jfig.SAE.init_random(jax.random.PRNGKey(1), D, 32, SITE, dtype=jnp.float64)
        tokens = np.random.default_rng(1).integers(0, V, size=(5, 7))
        feats = active_features(model, sae, tokens, 5)
        eff, n = attribution_effects(model, sae, tokens, feats, batch_size=2, chunk=3)
        ref = [central_difference(model, sae, tokens, i) for i in feats]
    return eff, n, ref


def test_attribution_is_the_sum_of_per_token_derivatives(f64_case):
    eff, n, ref = f64_case
    assert eff.dtype == np.float64 and len(eff) == 5
    for k, (d_nll, n_active) in enumerate(ref):
        assert n[k] == n_active > 0
        np.testing.assert_allclose(eff[k], np.abs(d_nll).sum() / n_active, rtol=1e-7)


def test_absolute_value_is_taken_per_token(f64_case):
    """Tokens whose loss moves in opposite directions do not cancel: the estimate exceeds the
    per-sequence |Σ_t Δnll_t| (an attribution-patching gradient of the summed loss) by a margin."""
    eff, n, ref = f64_case
    mixed = [k for k, (d, _) in enumerate(ref) if (d > 1e-3).any() and (d < -1e-3).any()]
    assert mixed, "no feature moves some tokens' loss up and others' down"
    for k in mixed:
        per_sequence = np.abs(ref[k][0].sum(1)).sum() / n[k]
        assert eff[k] > 1.05 * per_sequence


def test_attribution_approaches_exact_ablation_as_the_ablation_shrinks():
    """Logits linear in the site: Δnll_t(s) = s J_t + O(s²) for a decoder scaled by s, so
    attribution / exact ablation → 1 with an error proportional to s (float64, full-run path)."""
    with jax.enable_x64(True):
        model = function_model(linear=True)
        base = jfig.SAE.init_random(jax.random.PRNGKey(2), D, 32, SITE, dtype=jnp.float64)
        tokens = np.random.default_rng(2).integers(0, V, size=(3, 8))
        feats = active_features(model, base, tokens, 6)
        errs = []
        for s in (1e-2, 1e-3):
            sae = eqx.tree_at(lambda m: m.W_dec, base, base.W_dec * s)
            att, n_att = attribution_effects(model, sae, tokens, feats)
            exact, n_ex = ablation_effects(model, sae, tokens, feats)
            assert np.array_equal(n_att, n_ex)
            errs.append(np.abs(att / exact - 1))
    assert errs[1].max() < 2e-3
    np.testing.assert_allclose(errs[0] / errs[1], 10, rtol=0.3)


def tiny_llama():
    cfg = llama_config(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=40,
                       max_seq_len=16)
    return cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.3)


def test_prefix_path_equals_full_runs_on_a_builtin_model():
    """Built-in models differentiate only the suffix from the cached prefix; the same model wrapped
    as a function (full runs) gives the same numbers."""
    cfg, params = tiny_llama()
    model = jfig.Model.from_config(cfg, params)
    wrapped = jfig.Model.from_function(lambda p, t, hook: forward(cfg, p, tokens=t, hook=hook), params,
                                       sites=model.sites, vocab_size=cfg.vocab_size)
    site = "blocks.1.hook_resid_post"
    sae = jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 24, site)
    tokens = np.random.default_rng(0).integers(0, 40, size=(3, 9))
    feats = active_features(model, sae, tokens, 6)
    eff, n = attribution_effects(model, sae, tokens, feats, batch_size=2)
    eff_full, n_full = attribution_effects(wrapped, sae, tokens, feats, batch_size=2)
    assert np.array_equal(n, n_full) and np.all(eff > 0)
    np.testing.assert_allclose(eff, eff_full, rtol=1e-4)


def test_attribution_ranks_features_like_exact_ablation_on_a_tiny_llama():
    """A sanity check in float32, not the reference: over 16 features the first-order estimate
    orders features like the exact ablation effect."""
    cfg, params = tiny_llama()
    model = jfig.Model.from_config(cfg, params)
    site = "blocks.1.hook_resid_post"
    sae = jfig.SAE.init_random(jax.random.PRNGKey(3), 16, 48, site, "topk", k=6)
    tokens = np.random.default_rng(3).integers(0, 40, size=(8, 12))
    feats = active_features(model, sae, tokens, 16)
    assert len(feats) == 16
    att, n_att = attribution_effects(model, sae, tokens, feats)
    exact, n_ex = ablation_effects(model, sae, tokens, feats)
    assert np.array_equal(n_att, n_ex)
    assert spearmanr(att, exact).statistic > 0.8


def test_reverse_mode_at_several_sites_is_the_forward_mode_attribution():
    """attribution_by_site (one vjp per next-token prediction, shared by every site and feature) gives
    attribution_effects's numbers (one jvp per feature), float64 on a nonlinear function model and
    float32 on a tiny Llama at three sites with prediction chunks that do not divide seq - 1."""
    with jax.enable_x64(True):
        model = function_model()
        saes = [jfig.SAE.init_random(jax.random.PRNGKey(k), D, 32, s, dtype=jnp.float64)
                for k, s in enumerate(("h0", "h1"))]
        tokens = np.random.default_rng(2).integers(0, V, size=(5, 7))
        feats = {s.site: active_features(model, s, tokens, 6) for s in saes}
        rev = attribution_by_site(model, saes, tokens, feats, batch_size=2, t_chunk=4)
        for sae in saes:
            eff, n = attribution_effects(model, sae, tokens, feats[sae.site], batch_size=2)
            np.testing.assert_array_equal(rev[sae.site][1], n)
            np.testing.assert_allclose(rev[sae.site][0], eff, rtol=1e-10)
    cfg, params = tiny_llama()
    model = jfig.Model.from_config(cfg, params)
    sites = [f"blocks.{l}.hook_resid_post" for l in range(3)]
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(5 + k), 16, 24, s) for k, s in enumerate(sites)]
    tokens = np.random.default_rng(3).integers(0, 40, size=(3, 9))
    feats = {s.site: active_features(model, s, tokens, 7) for s in saes}
    rev = attribution_by_site(model, saes, tokens, feats, batch_size=2, t_chunk=3)
    for sae in saes:
        eff, n = attribution_effects(model, sae, tokens, feats[sae.site], batch_size=2)
        assert len(eff) == 7 and np.isfinite(eff).all() and (eff > 0).all()
        np.testing.assert_array_equal(rev[sae.site][1], n)
        np.testing.assert_allclose(rev[sae.site][0], eff, rtol=2e-4)
