"""A bfloat16 model measures what its float32 original does, to bfloat16 precision, with float32 statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.models.registry import parse_dtype
from tests.support.tiny_models import tiny_model

SITES = ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")


@pytest.mark.parametrize("sparse", [True, False])
def test_bfloat16_model_effects_match_float32(sparse):
    model = tiny_model("llama")
    half = jfig.Model.from_config(model.config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.params))
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), 16, 32, s) for i, s in enumerate(SITES)]
    toks = np.random.default_rng(0).integers(0, 50, size=(24, 10))
    kw = dict(inputs_per_source=8, progress=False, keep_per_input=True, sparse=sparse)
    full = jfig.measure_effects(model, saes, {SITES[0]: [0, 1, 2, 3]}, toks, **kw)
    low = jfig.measure_effects(half, saes, {SITES[0]: [0, 1, 2, 3]}, toks, **kw)
    assert low.mean.dtype == np.float32 and low.per_input.dtype == np.float32
    scale = np.nanmax(np.abs(full.mean))
    err = np.nanmax(np.abs(low.mean - full.mean))
    assert 0 < err < 2e-2 * scale                    # bfloat16 weights change the numbers, by a few 1e-3


def test_dtype_names():
    assert parse_dtype("bfloat16") == jnp.bfloat16 and parse_dtype(jnp.float32) == jnp.float32
    with pytest.raises(jfig.OptionError, match="dtype must be one of float32, bfloat16, float16, float64, got 'bf16'"):
        parse_dtype("bf16")
