"""The position-sparse suffix (only the clamped token runs, attending to the clean keys/values of earlier
positions) gives the full suffix's numbers: at the model level, for every first-order method, and for
gating, on tiny models of every family."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.errors import ShapeError
from jfig.measure import measure_gating
from jfig.models.model import Prefix
from tests.support.tiny_models import tiny_model

FAMILIES = ("llama", "gpt2", "gemma2")
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.3.hook_resid_post")


def close(sparse, full):
    """Equal to float32 round-off, relative to the largest value (both arrays, NaN where unread)."""
    np.testing.assert_array_equal(np.isnan(sparse), np.isnan(full))
    scale = np.nanmax(np.abs(full))
    assert scale > 1e-3                                          # something was measured
    np.testing.assert_allclose(np.nan_to_num(sparse), np.nan_to_num(full), rtol=0, atol=2e-5 * scale)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    model = tiny_model(request.param)
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), 16, 32, s) for i, s in enumerate(SITES)]
    toks = np.random.default_rng(0).integers(0, 50, size=(24, 10))
    return model, saes, toks


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z", "blocks.2.mlp.hook_post"])
def test_suffix_from_one_position_equals_the_full_suffix(case, site):
    """Edit one position per row (a different one in each row), run the suffix from there: the one
    token with the clean cache gives the full run's activations at that position."""
    model, _, toks = case
    pre, cached = model.prefix(toks[:3], site), model.prefix(toks[:3], site, cache=True)
    np.testing.assert_allclose(cached.acts, pre.acts, atol=1e-5)
    p = jnp.array([4, 9, 0])
    rows = jnp.arange(3)
    delta = jax.random.normal(jax.random.PRNGKey(1), pre.acts.shape)
    mask = jax.nn.one_hot(p, toks.shape[1]).reshape(3, toks.shape[1], *([1] * (pre.acts.ndim - 2)))
    edited = pre.acts + mask * delta
    out = "blocks.3.hook_resid_post"
    full = model.run_suffix(Prefix(site, edited, pre.resid), capture=(out,), stop_at=out).cache[out]
    one = model.run_suffix(Prefix(site, edited[rows, p][:, None], None if pre.resid is None else pre.resid[rows, p][:, None],
                                  cached.cache), capture=(out,), stop_at=out, positions=p[:, None]).cache[out]
    np.testing.assert_allclose(one[:, 0], full[rows, p], atol=1e-5 * float(jnp.abs(full).max()))
    assert float(jnp.abs(full[rows, p] - model.run_suffix(pre, capture=(out,), stop_at=out).cache[out][rows, p]).max()) > 1e-3


def test_position_sparse_suffix_needs_cache_and_positions(case):
    model, _, toks = case
    pre = model.prefix(toks[:2], SITES[1])
    with pytest.raises(ShapeError, match="needs both prefix.cache"):
        model.run_suffix(pre, capture=(SITES[2],), positions=jnp.zeros((2, 10), jnp.int32))


@pytest.mark.parametrize("method", ["clamp", "ablate", "mean_ablate", "jacobian", "jacobian_direct"])
def test_first_order_effects_equal_the_full_suffix(case, method):
    model, saes, toks = case
    kw = dict(method=method, inputs_per_source=8, progress=False, keep_per_input=True, mode="forward")
    sparse = jfig.measure_effects(model, saes, {SITES[0]: [0, 1, 2, 3]}, toks, **kw)
    full = jfig.measure_effects(model, saes, {SITES[0]: [0, 1, 2, 3]}, toks, sparse=False, **kw)
    np.testing.assert_array_equal(sparse.n, full.n)
    close(sparse.per_input, full.per_input)
    close(sparse.mean, full.mean)


def test_random_direction_null_equals_the_full_suffix(case):
    model, saes, toks = case
    kw = dict(inputs_per_source=8, progress=False, direction="random", seed=3)
    close(jfig.measure_effects(model, saes, {SITES[1]: [0, 5]}, toks, **kw).mean,
          jfig.measure_effects(model, saes, {SITES[1]: [0, 5]}, toks, sparse=False, **kw).mean)


@pytest.mark.parametrize("method", ["factorial", "mixed"])
def test_gating_equals_the_full_suffix(case, method):
    """Same-site and earlier-site modulators."""
    model, saes, toks = case
    pairs = [((SITES[1], 0), (SITES[1], 1)), ((SITES[1], 2), (SITES[0], 3)), ((SITES[1], 4), (SITES[0], 5))]
    kw = dict(method=method, inputs_per_pair=8, keep_per_input=True, targets={SITES[2]: list(range(10))})
    sparse = measure_gating(model, saes, pairs, toks, **kw)
    full = measure_gating(model, saes, pairs, toks, sparse=False, **kw)
    np.testing.assert_array_equal(sparse.n, full.n)
    close(sparse.per_input, full.per_input)


def test_shared_clean_prefix_gives_the_same_effects(case):
    """One clean run at every site, reused by measurements at several sites, equals each measurement
    running its own prefix; tokens of another shape are refused."""
    model, saes, toks = case
    clean = jfig.measure.clean_prefix(model, toks, SITES, batch_size=7)
    assert clean.nbytes == jfig.measure.clean_prefix_bytes(model.config, *toks.shape, [16] * 3) - 4 * 24 * 10 * 16 * 3
    for site, method in ((SITES[0], "clamp"), (SITES[1], "jacobian")):
        kw = dict(method=method, inputs_per_source=8, progress=False, keep_per_input=True, mode="forward")
        shared = jfig.measure_effects(model, saes, {site: [0, 1, 2]}, toks, clean=clean, **kw)
        own = jfig.measure_effects(model, saes, {site: [0, 1, 2]}, toks, **kw)
        close(shared.per_input, own.per_input)
    pairs = [((SITES[1], 0), (SITES[0], 1))]
    kw = dict(method="factorial", inputs_per_pair=8, keep_per_input=True, targets={SITES[2]: list(range(10))})
    close(measure_gating(model, saes, pairs, toks, clean=clean, **kw).per_input,
          measure_gating(model, saes, pairs, toks, **kw).per_input)
    for read in ("post", "pre"):                  # target spreads read from the shared run equal their own run
        np.testing.assert_allclose(jfig.measure.activation_sd(model, saes[2], [0, 3, 7], toks, read=read, clean=clean),
                                   jfig.measure.activation_sd(model, saes[2], [0, 3, 7], toks, read=read), rtol=1e-5)
    with pytest.raises(jfig.JfigError, match="clean prefix was run on tokens of shape"):
        jfig.measure_effects(model, saes, {SITES[0]: [0]}, toks[:12], clean=clean, progress=False)


@pytest.mark.parametrize("variant", [dict(inputs="target_active", read="post"), dict(read="pre"),
                                     dict(source_site="blocks.1.attn.hook_z")])
def test_sparse_variants_equal_the_full_suffix(case, variant):
    """Per-pair inputs where the target is active, pre-activation reads, and a source at attn.hook_z
    ([batch, seq, heads, d_head] activations)."""
    model, saes, toks = case
    variant = dict(variant)
    site = variant.pop("source_site", SITES[0])
    if site not in SITES:
        saes = saes + [jfig.SAE.init_random(jax.random.PRNGKey(9), 16, 32, site, reshape_hook_z=True,
                                            hook_z_shape=(4, 4))]
    kw = dict(inputs_per_source=8, progress=False, keep_per_input=True, targets={SITES[2]: list(range(16))}, **variant)
    sparse = jfig.measure_effects(model, saes, {site: [0, 1, 2]}, toks, **kw)
    full = jfig.measure_effects(model, saes, {site: [0, 1, 2]}, toks, sparse=False, **kw)
    np.testing.assert_array_equal(sparse.n, full.n)
    close(sparse.mean, full.mean)
