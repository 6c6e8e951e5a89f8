"""Sites, edits, capture, suffix runs, vmap over edits, adapters and retracing on tiny models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jfig
from jfig.edits import Ablate, Clamp, Compose, Patch, Steer
from jfig.models.forward import forward
from jfig.saes import SAE
from tests.support.tiny_models import tiny_model

SITE = "blocks.1.hook_resid_post"


def tiny(family="llama", **kw):
    return tiny_model(family, scale=0.2, **kw)


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def sae():
    s = SAE.init_random(jax.random.PRNGKey(1), 16, 32, SITE)
    return jax.tree.map(lambda a: a, s)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 7)))


def test_sites_listed_in_forward_order(model):
    assert model.sites[0] == "hook_embed"
    assert model.sites[1:4] == ("blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k")
    assert model.sites[-1] == "blocks.3.hook_resid_post"
    assert "hook_pos_embed" in tiny("gpt2").sites


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_capture_shapes_and_consistency(family):
    m = tiny(family)
    out = m.run(TOKENS, capture=m.sites)
    c, b, s = m.config, 2, 7
    assert out.logits.shape == (b, s, 50)
    assert out.cache["blocks.2.attn.hook_q"].shape == (b, s, c.n_heads, c.d_head)
    assert out.cache["blocks.2.attn.hook_k"].shape == (b, s, c.n_kv_heads, c.d_head)
    assert out.cache["blocks.2.attn.hook_pattern"].shape == (b, c.n_heads, s, s)
    assert out.cache["blocks.2.mlp.hook_post"].shape == (b, s, c.d_mlp)
    np.testing.assert_allclose(out.cache["blocks.2.attn.hook_pattern"].sum(-1), 1.0, atol=1e-5)
    for l in range(4):
        pre, mid, post = (out.cache[f"blocks.{l}.{n}"] for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
        np.testing.assert_allclose(pre + out.cache[f"blocks.{l}.hook_attn_out"], mid, atol=1e-5)
        np.testing.assert_allclose(mid + out.cache[f"blocks.{l}.hook_mlp_out"], post, atol=1e-5)
    # capturing changes nothing; scanning unhooked layers equals the unrolled forward
    np.testing.assert_allclose(m.run(TOKENS).logits, out.logits, atol=1e-5)
    unrolled = forward(m.config, m.params, tokens=TOKENS, scan=False)
    np.testing.assert_allclose(unrolled, out.logits, atol=1e-5)


def test_stop_at_returns_cache_without_logits(model):
    full = model.run(TOKENS, capture=(SITE,))
    out = model.run(TOKENS, capture=(SITE,), stop_at=SITE)
    assert out.logits is None
    np.testing.assert_allclose(out.cache[SITE], full.cache[SITE], atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(feature=st.integers(0, 31), pos=st.integers(0, 6))
def test_clamp_to_current_value_changes_nothing(model, sae, feature, pos):
    toks = TOKENS[:1]
    base = model.run(toks, capture=(SITE,))
    cur = sae.encode(base.cache[SITE])[0, pos, feature]
    out = model.run(toks, edits=(Clamp(sae, feature, cur, positions=[pos]),), capture=(SITE,))
    np.testing.assert_allclose(out.logits, base.logits, atol=1e-5)


def test_clamp_is_error_preserving_and_sets_feature(model, sae):
    base = model.run(TOKENS, capture=(SITE,)).cache[SITE]
    out = model.run(TOKENS, edits=Clamp(sae, 5, 3.0), capture=(SITE,)).cache[SITE]
    f0, f1 = sae.encode(base), sae.encode(out)
    # the edited activations equal the original plus (3 - f_5) * d_5
    np.testing.assert_allclose(out, base + (3.0 - f0[..., 5:6]) * sae.W_dec[5], atol=1e-5)
    # the SAE error term is unchanged by construction: x' - decode(f with f5 = 3) == x - decode(f)
    f_set = f0.at[..., 5].set(3.0)
    np.testing.assert_allclose(out - sae.decode(f_set), base - sae.decode(f0), atol=1e-5)
    assert f1.shape == f0.shape


def test_ablate_equals_clamp_to_zero(model, sae):
    a = model.run(TOKENS, edits=(Ablate(sae, 3),)).logits
    b = model.run(TOKENS, edits=(Clamp(sae, 3, 0.0),)).logits
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_vmap_over_edits_equals_loop(model, sae):
    feats = jnp.arange(6)
    vals = jnp.linspace(-1.0, 4.0, 6)

    def one(f, v):
        return model.run(TOKENS, edits=(Clamp(sae, f, v, positions=jnp.array([2, 5])),)).logits

    batched = jax.vmap(one)(feats, vals)
    looped = jnp.stack([one(int(f), float(v)) for f, v in zip(feats, vals)])
    np.testing.assert_allclose(batched, looped, atol=1e-5)
    jitted = jax.jit(jax.vmap(one))(feats, vals)
    np.testing.assert_allclose(jitted, looped, atol=1e-5)


def test_positions_only_affect_later_positions(model, sae):
    base = model.run(TOKENS).logits
    out = model.run(TOKENS, edits=(Clamp(sae, 1, 10.0, positions=[4]),)).logits
    np.testing.assert_allclose(out[:, :4], base[:, :4], atol=1e-6)
    assert np.abs(out[:, 4:] - base[:, 4:]).max() > 1e-4
    mask = jnp.zeros((2, 7), bool).at[0, 4].set(True)  # per-example mask: only example 0 edited
    out2 = model.run(TOKENS, edits=(Clamp(sae, 1, 10.0, positions=mask),)).logits
    np.testing.assert_allclose(out2[1], base[1], atol=1e-6)
    np.testing.assert_allclose(out2[0], out[0], atol=1e-6)


def test_steer_patch_compose(model):
    base = model.run(TOKENS, capture=(SITE,))
    d = jnp.ones(16)
    steered = model.run(TOKENS, edits=Steer(SITE, d, 0.5), capture=(SITE,))
    np.testing.assert_allclose(steered.cache[SITE], base.cache[SITE] + 0.5, atol=1e-6)
    # activation patching: patch the other example's resid in -> the rest of the run follows it
    other = TOKENS[::-1]
    src = model.run(other, capture=(SITE,)).cache[SITE]
    patched = model.run(TOKENS, edits=Patch(SITE, src, positions=None)).logits
    np.testing.assert_allclose(patched, model.run(other).logits, atol=1e-5)
    # compose applies in order
    two = model.run(TOKENS, edits=Compose(Steer(SITE, d, 1.0), Steer(SITE, d, -1.0))).logits
    np.testing.assert_allclose(two, base.logits, atol=1e-5)


@pytest.mark.parametrize("start", [
    "hook_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_mid", "blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post",
])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_suffix_run_equals_full_run(family, start):
    m = tiny(family)
    full = m.run(TOKENS, capture=("blocks.3.hook_resid_mid",))
    pre = m.prefix(TOKENS, start)
    out = m.run_suffix(pre, logits=True, capture=("blocks.3.hook_resid_mid",))
    np.testing.assert_allclose(out.logits, full.logits, atol=1e-5)
    stopped = m.run_suffix(pre, stop_at="blocks.3.hook_resid_mid", capture=("blocks.3.hook_resid_mid",))
    assert stopped.logits is None
    np.testing.assert_allclose(stopped.cache["blocks.3.hook_resid_mid"], full.cache["blocks.3.hook_resid_mid"], atol=1e-5)


def test_suffix_with_edit_at_start_equals_full_run_with_edit(model, sae):
    edit = Clamp(sae, 7, 2.5)
    full = model.run(TOKENS, edits=(edit,)).logits
    pre = model.prefix(TOKENS, SITE)
    np.testing.assert_allclose(model.run_suffix(pre, edits=(edit,), logits=True).logits, full, atol=1e-5)
    vm = jax.vmap(lambda v: model.run_suffix(pre, edits=(Clamp(sae, 7, v),), logits=True).logits)(jnp.array([2.5, 0.0]))
    np.testing.assert_allclose(vm[0], full, atol=1e-5)


def _adapter(m):
    """Wrap the built-in forward as a user function that calls hook() at every site."""
    cfg = m.config

    class Every:
        def __init__(self, hook):
            self.hook, self.sites = hook, frozenset(m.sites)

        def __call__(self, site, x):
            return self.hook(site, x)

    def apply(params, tokens, hook):
        return forward(cfg, params, tokens=tokens, hook=Every(hook))

    return jfig.Model.from_function(apply, m.params, sites=m.sites, vocab_size=cfg.vocab_size,
                                    site_widths=dict(m.site_widths))


def test_adapter_model_equals_builtin(model, sae):
    wrapped = _adapter(model)
    edit = Clamp(sae, 2, 4.0, positions=[1, 3])
    a = model.run(TOKENS, edits=(edit,), capture=(SITE, "blocks.3.mlp.hook_post"))
    b = wrapped.run(TOKENS, edits=(edit,), capture=(SITE, "blocks.3.mlp.hook_post"))
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-5)
    for k in a.cache:
        np.testing.assert_allclose(b.cache[k], a.cache[k], atol=1e-5)
    stopped = wrapped.run(TOKENS, capture=(SITE,), stop_at=SITE)
    np.testing.assert_allclose(stopped.cache[SITE], a.cache[SITE] if False else model.run(TOKENS, capture=(SITE,)).cache[SITE], atol=1e-5)
    with pytest.raises(jfig.JfigError, match="from_function"):
        wrapped.prefix(TOKENS, SITE)


def test_plain_function_adapter():
    """A hand-written JAX function (no jfig internals) plugs in the same way."""
    W = jax.random.normal(jax.random.PRNGKey(3), (10, 8))

    def apply(params, tokens, hook):
        h = hook("embed", params["E"][tokens])
        h = hook("hidden", jnp.tanh(h @ params["W"]))
        return h @ params["E"].T

    params = {"E": jax.random.normal(jax.random.PRNGKey(4), (10, 8)), "W": W[:8]}
    m = jfig.Model.from_function(apply, params, sites=("embed", "hidden"), vocab_size=10)
    toks = jnp.array([[1, 2, 3]])
    out = m.run(toks, edits=(Steer("hidden", jnp.ones(8), 0.0),), capture=("hidden",))
    ref = jnp.tanh(params["E"][toks] @ params["W"])
    np.testing.assert_allclose(out.cache["hidden"], ref, atol=1e-6)


def test_no_retrace_for_same_shapes(model, sae, count_traces):
    model.run(TOKENS, edits=(Clamp(sae, 1, 1.0),), capture=(SITE,))
    with count_traces() as traces:
        for f, v in [(2, 0.5), (9, 3.0), (31, -1.0)]:
            model.run(TOKENS, edits=(Clamp(sae, f, v),), capture=(SITE,))
        model.run(TOKENS + 1, edits=(Clamp(sae, 4, 2.0),), capture=(SITE,))
    assert traces.count == 0
    with count_traces() as traces:                       # the counter does see a new shape
        model.run(TOKENS[:, :3], edits=(Clamp(sae, 4, 2.0),), capture=(SITE,))
    assert traces.count > 0


def test_freeze_keeps_values(model):
    np.testing.assert_allclose(model.run(TOKENS, freeze=True).logits, model.run(TOKENS).logits, atol=1e-6)


def test_errors_are_clear(model, sae):
    with pytest.raises(jfig.SiteError, match="blocks.9.hook_resid_post"):
        model.run(TOKENS, capture=("blocks.9.hook_resid_post",))
    with pytest.raises(jfig.SiteError, match="unknown site"):
        model.run(TOKENS, capture=("blocks.1.resid",))
    wide = SAE.init_random(jax.random.PRNGKey(2), 24, 8, SITE)
    with pytest.raises(jfig.ShapeError, match="SAE d_in 24 does not match site blocks.1.hook_resid_post width 16"):
        model.run(TOKENS, edits=(Clamp(wide, 0, 1.0),))
    with pytest.raises(jfig.ShapeError, match="integer dtype"):
        model.run(TOKENS.astype(jnp.float32))
    with pytest.raises(jfig.ShapeError, match="rank 2"):
        model.run(TOKENS[None])
    with pytest.raises(jfig.ShapeError, match="outside the vocabulary"):
        model.run(TOKENS.at[0, 0].set(50))
    with pytest.raises(jfig.SiteError, match="before the suffix start"):
        model.run_suffix(model.prefix(TOKENS, SITE), capture=("blocks.0.hook_resid_post",))
    with pytest.raises(jfig.SiteError, match="cannot start"):
        model.prefix(TOKENS, "blocks.1.attn.hook_q")
