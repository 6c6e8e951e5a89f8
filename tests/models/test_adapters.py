"""flax (NNX, Linen) and penzai models as jfig Models: same logits as their own forwards, captures
equal to the frameworks' own intermediates, edits equal to hand-written loops, measurements and a
graph build end to end, and the errors for bad mappings."""
import re
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.variants import gpt_neox, llamalike_common

import jfig
from jfig.edits import Clamp
from jfig.errors import JfigError, ShapeError, SiteError
from tests.support.flax_transformer import Block, causal_mask, linen_transformer, nnx_transformer
from tests.support.penzai_reference import jfig_model, penzai_logits, tiny_llamalike

S0, S1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(3, 9)))
FEATURE, ALPHA = 5, 4.0


def random_sae(site, d_in=16, d_sae=32, seed=1):
    return jfig.SAE.init_random(jax.random.PRNGKey(seed), d_in, d_sae, site)


def clamp_by_hand(sae, x, feature=FEATURE, alpha=ALPHA):
    """x + (alpha - f_i(x)) d_i for a ReLU SAE without input normalisation (b_dec = 0)."""
    f = jax.nn.relu(x @ sae.W_enc[:, feature] + sae.b_enc[feature])
    return x + (alpha - f)[..., None] * sae.W_dec[feature]


# ---------------------------------------------------------------- penzai: llama-like vs jfig's forward

@pytest.fixture(scope="module")
def llamalike():
    """(penzai model, the built-in jfig model on its weights, the penzai model wrapped by from_penzai)."""
    pz_model, cfg = tiny_llamalike()
    return pz_model, jfig_model(pz_model, cfg), jfig.Model.from_penzai(pz_model)


def test_penzai_llamalike_logits_equal_jfig_forward(llamalike):
    pz_model, builtin, wrapped = llamalike
    ref = builtin.run(TOKENS).logits
    np.testing.assert_allclose(penzai_logits(pz_model, TOKENS), ref, atol=1e-4)     # the converter is right
    np.testing.assert_allclose(wrapped.run(TOKENS).logits, ref, atol=1e-4)
    assert wrapped.vocab_size == 50 and wrapped.config is None


def test_penzai_default_sites_mean_what_jfig_sites_mean(llamalike):
    _, builtin, wrapped = llamalike
    assert wrapped.sites == ("hook_embed",) + tuple(
        f"blocks.{l}.{s}" for l in range(2) for s in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                                                         "mlp.hook_post", "hook_mlp_out", "hook_resid_post"))
    assert wrapped.site_width("blocks.0.mlp.hook_post") == 24 and wrapped.site_width(S0) == 16
    a, b = wrapped.run(TOKENS, capture=wrapped.sites), builtin.run(TOKENS, capture=wrapped.sites)
    for s in wrapped.sites:
        np.testing.assert_allclose(a.cache[s], b.cache[s], atol=1e-4, err_msg=s)


def test_penzai_clamp_effect_equals_builtin(llamalike):
    _, builtin, wrapped = llamalike
    sae = random_sae(S0)
    edit = Clamp(sae, FEATURE, ALPHA)

    def effect(model):
        return model.run(TOKENS, edits=(edit,), capture=(S1,)).cache[S1] - model.run(TOKENS, capture=(S1,)).cache[S1]

    want = effect(builtin)
    assert float(jnp.abs(want).max()) > 0.1                       # the clamp does something
    np.testing.assert_allclose(effect(wrapped), want, atol=1e-4)


@pz.pytree_dataclass
class AddClampDelta(pz.nn.Layer):
    """x + (alpha - f_i(x)) d_i on the residual (named axes batch, seq, embedding), written by hand."""

    w_enc: jax.Array
    b_enc: jax.Array
    d: jax.Array
    alpha: float

    def __call__(self, x, **side_inputs):
        h = x.unwrap("batch", "seq", "embedding")
        f = jax.nn.relu(h @ self.w_enc + self.b_enc)
        return pz.nx.wrap(h + (self.alpha - f)[..., None] * self.d).tag("batch", "seq", "embedding")


def test_penzai_clamp_equals_hand_inserted_layer(llamalike):
    pz_model, _, wrapped = llamalike
    sae = random_sae(S0)
    layer = AddClampDelta(sae.W_enc[:, FEATURE], sae.b_enc[FEATURE], sae.W_dec[FEATURE], ALPHA)
    by_hand = (pz.select(pz_model).at_instances_of(model_parts.TransformerBlock).pick_nth_selected(0)
               .insert_after(layer))
    want = penzai_logits(by_hand, TOKENS)
    assert float(jnp.abs(want - penzai_logits(pz_model, TOKENS)).max()) > 1e-2
    np.testing.assert_allclose(wrapped.run(TOKENS, edits=(Clamp(sae, FEATURE, ALPHA),)).logits, want, atol=1e-4)


@pytest.mark.parametrize("method", ["clamp", "jacobian"])
def test_penzai_measurements_equal_builtin(llamalike, method):
    """measure_effects on the wrapped model (whole forward passes) equals the built-in model's
    (cached prefix, only the clamped token in the suffix)."""
    _, builtin, wrapped = llamalike
    saes = [random_sae(S0, seed=2), random_sae(S1, seed=3)]
    toks = np.random.default_rng(4).integers(0, 50, size=(16, 8))
    kw = dict(inputs_per_source=8, progress=False, method=method)
    a = jfig.measure_effects(wrapped, saes, {S0: [0, 1, 2, 3]}, toks, **kw)
    b = jfig.measure_effects(builtin, saes, {S0: [0, 1, 2, 3]}, toks, **kw)
    assert np.isfinite(b.mean).any()
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(a.n, b.n)


def test_penzai_sites_by_selector_keypath_and_input(llamalike):
    pz_model, builtin, _ = llamalike
    second = lambda m: pz.select(m).at_instances_of(model_parts.TransformerBlock).pick_nth_selected(1)  # noqa: E731
    custom = jfig.Model.from_penzai(pz_model, sites={S0: ".body.sublayers[1]",
                                                     "blocks.1.hook_resid_pre": (second, "input"), S1: second})
    assert custom.sites == (S0, "blocks.1.hook_resid_pre", S1)
    sites = custom.sites
    a, b = custom.run(TOKENS, capture=sites), builtin.run(TOKENS, capture=sites)
    for s in sites:
        np.testing.assert_allclose(a.cache[s], b.cache[s], atol=1e-4)
    named = jfig.Model.from_penzai(pz_model, sites={"late": second, "early": "body.sublayers[1]"},
                                   site_order=("early", "late"))
    np.testing.assert_allclose(named.run(TOKENS, capture=("late",)).cache["late"], b.cache[S1], atol=1e-4)


def test_penzai_gpt_neox_parallel_blocks():
    cfg = gpt_neox.GPTNeoXTransformerConfig(
        num_attention_heads=2, embedding_dim=8, projection_dim=4, mlp_hidden_dim=16, num_decoder_blocks=2,
        vocab_size=30, activation_fn="gelu_exact", rope_subset_size=2, rope_wavelength=10000.0,
        layernorm_epsilon=1e-5, parameter_dtype=jnp.float32, activation_dtype=jnp.float32)
    pz_model = gpt_neox.build_gpt_neox_transformer(cfg, init_base_rng=jax.random.key(1))
    wrapped = jfig.Model.from_penzai(pz_model)
    assert "blocks.0.hook_resid_mid" not in wrapped.sites and "blocks.1.mlp.hook_post" in wrapped.sites
    toks = TOKENS % 30
    out = wrapped.run(toks, capture=wrapped.sites)
    np.testing.assert_allclose(out.logits, penzai_logits(pz_model, toks), atol=1e-5)
    c = out.cache
    for l in range(2):    # a parallel block: resid_post = resid_pre + attn_out + mlp_out
        np.testing.assert_allclose(c[f"blocks.{l}.hook_resid_post"], c[f"blocks.{l}.hook_resid_pre"]
                                   + c[f"blocks.{l}.hook_attn_out"] + c[f"blocks.{l}.hook_mlp_out"], atol=1e-5)


# ---------------------------------------------------------------- flax NNX

NNX_SITES = {"hook_embed": "embed",
             **{f"blocks.{l}.hook_attn_out": f"layers[{l}].attn" for l in range(2)},
             **{f"blocks.{l}.hook_mlp_out": ("layers", l, "mlp") for l in range(2)},
             **{f"blocks.{l}.hook_resid_post": f"layers.{l}" for l in range(2)}}


@pytest.fixture(scope="module")
def nnx_pair():
    module = nnx_transformer()
    return module, jfig.Model.from_flax(module, sites=NNX_SITES)


def nnx_by_hand(module, tokens, sae=None):
    """The NNX transformer's forward written out block by block, the clamp after block 0 when `sae` is
    given: (logits, [residual after each block])."""
    mask = causal_mask(tokens)
    x, resid = module.embed(tokens), []
    for l, block in enumerate(module.layers):
        x = block(x, mask)
        if l == 0 and sae is not None:
            x = clamp_by_hand(sae, x)
        resid.append(x)
    return module.unembed(module.ln_f(x)), resid


def test_nnx_logits_equal_module(nnx_pair):
    module, wrapped = nnx_pair
    np.testing.assert_allclose(wrapped.run(TOKENS).logits, module(TOKENS), atol=1e-5)
    assert wrapped.vocab_size == 50
    assert dict(wrapped.site_widths) == dict.fromkeys(NNX_SITES, 16)


def test_nnx_captures_equal_nnx_capture(nnx_pair):
    """Captures equal what nnx.capture records as each submodule's __call__ output."""
    module, wrapped = nnx_pair
    _, inter = nnx.capture(module, nnx.Intermediate, method_outputs=nnx.Intermediate)(TOKENS)
    out = wrapped.run(TOKENS, capture=wrapped.sites)
    np.testing.assert_allclose(out.cache["hook_embed"], inter["embed"]["__call__"].value[0], atol=1e-5)
    for l in range(2):
        own = inter["layers"][l]
        np.testing.assert_allclose(out.cache[f"blocks.{l}.hook_resid_post"], own["__call__"].value[0], atol=1e-5)
        np.testing.assert_allclose(out.cache[f"blocks.{l}.hook_attn_out"], own["attn"]["__call__"].value[0],
                                   atol=1e-5)
        np.testing.assert_allclose(out.cache[f"blocks.{l}.hook_mlp_out"], own["mlp"]["__call__"].value[0], atol=1e-5)


def test_nnx_clamp_equals_hand_loop(nnx_pair):
    module, wrapped = nnx_pair
    sae = random_sae(S0)
    want_logits, want_resid = nnx_by_hand(module, TOKENS, sae)
    clean_logits, _ = nnx_by_hand(module, TOKENS)
    assert float(jnp.abs(want_logits - clean_logits).max()) > 1e-2
    out = wrapped.run(TOKENS, edits=(Clamp(sae, FEATURE, ALPHA),), capture=(S0, S1))
    np.testing.assert_allclose(out.logits, want_logits, atol=1e-4)
    np.testing.assert_allclose(out.cache[S0], want_resid[0], atol=1e-5)      # captured after the edit
    np.testing.assert_allclose(out.cache[S1], want_resid[1], atol=1e-4)


def test_nnx_runs_leave_the_module_and_its_classes_alone(nnx_pair):
    """Runs work on a merged copy; the wrapped __call__ methods are restored, also after a run that
    stops early (StopRun raised inside a hooked call)."""
    module, wrapped = nnx_pair
    classes = {type(m) for _, m in nnx.iter_modules(module)}
    calls = {cls: cls.__dict__.get("__call__") for cls in classes}
    before = jax.tree.map(np.asarray, nnx.state(module))
    stopped = wrapped.run(TOKENS, capture=("hook_embed",), stop_at="blocks.0.hook_attn_out")
    assert stopped.logits is None
    np.testing.assert_allclose(stopped.cache["hook_embed"], module.embed(TOKENS), atol=1e-6)
    wrapped.run(TOKENS, edits=(Clamp(random_sae(S0), FEATURE, ALPHA),))
    with pytest.raises(ShapeError, match="does not match site blocks.0.hook_resid_post width 16"):
        wrapped.run(TOKENS, edits=(Clamp(random_sae(S0, d_in=8), 0, 1.0),))      # refused before the run
    assert {cls: cls.__dict__.get("__call__") for cls in classes} == calls
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(module)))


def test_nnx_given_state_and_predicate_sites():
    module, other = nnx_transformer(seed=0), nnx_transformer(seed=7)
    wrapped = jfig.Model.from_flax(module, nnx.state(other),
                                   sites={S1: lambda path, m: path == ("layers", 1),
                                          S0: lambda path, m: isinstance(m, Block) and path[-1] == 0})
    assert wrapped.sites == (S0, S1)
    np.testing.assert_allclose(wrapped.run(TOKENS).logits, other(TOKENS), atol=1e-5)


def test_nnx_measurements_equal_hand_written_function(nnx_pair):
    """The adapter's apply and a hand-written `from_function` apply over the same state measure the same."""
    module, wrapped = nnx_pair
    graphdef, state = nnx.split(module)

    def apply(params, tokens, hook):
        m = nnx.merge(graphdef, params)
        mask, x = causal_mask(tokens), m.embed(tokens)
        for l, block in enumerate(m.layers):
            x = hook(f"blocks.{l}.hook_resid_post", block(x, mask))
        return m.unembed(m.ln_f(x))

    by_hand = jfig.Model.from_function(apply, state, sites=(S0, S1), vocab_size=50, site_widths={S0: 16, S1: 16})
    saes = [random_sae(S0, seed=2), random_sae(S1, seed=3)]
    toks = np.random.default_rng(5).integers(0, 50, size=(16, 8))
    kw = dict(inputs_per_source=8, progress=False)
    a = jfig.measure_effects(wrapped, saes, {S0: [0, 1, 2]}, toks, **kw)
    b = jfig.measure_effects(by_hand, saes, {S0: [0, 1, 2]}, toks, **kw)
    assert np.isfinite(a.mean).any()
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-6)


def test_nnx_build_graph_end_to_end():
    module = nnx_transformer()
    model = jfig.Model.from_flax(module, sites={S0: "layers.0", S1: "layers.1"})
    saes = [random_sae(S0, seed=2), random_sae(S1, seed=3)]
    toks = np.random.default_rng(0).integers(0, 50, size=(64, 8))
    g = jfig.build_graph(model, saes, toks, seq_len=8, top_k=8, min_alignment=0.0, inputs_per_source=16,
                         block_size=16, progress=False)
    stats = g.manifest["statistics"]
    assert stats["n_tested"] > 0 and len(g.nodes) > 0 and min(stats["tau"].values()) > 0
    assert g.manifest["options"]["inputs_per_source"] == 16
    e = g.edges.to_pydict()       # random SAEs: few or no edges stand out from the random-direction null
    assert set(e["source_site"]) <= {S0} and set(e["target_site"]) <= {S1}
    assert all(np.isfinite(e["weight"]))


# ---------------------------------------------------------------- flax Linen

@pytest.fixture(scope="module")
def linen_pair():
    module, variables = linen_transformer()
    sites = {**{f"blocks.{l}.hook_resid_post": f"layers_{l}" for l in range(2)},
             "blocks.0.hook_attn_out": "layers_0.attn", "blocks.0.hook_mlp_out": "layers_0/mlp"}
    return module, variables, jfig.Model.from_flax(module, variables, sites=sites)


def linen_by_hand(module, tokens, sae):
    mask = causal_mask(tokens)
    x = module.embed(tokens)
    for l, block in enumerate(module.layers):
        x = block(x, mask)
        if l == 0:
            x = clamp_by_hand(sae, x)
    return module.unembed(module.ln_f(x))


def test_linen_logits_and_captures(linen_pair):
    module, variables, wrapped = linen_pair
    want, state = module.apply(variables, TOKENS, capture_intermediates=True, mutable=["intermediates"])
    out = wrapped.run(TOKENS, capture=wrapped.sites)
    np.testing.assert_allclose(out.logits, want, atol=1e-5)
    own = state["intermediates"]
    np.testing.assert_allclose(out.cache[S0], own["layers_0"]["__call__"][0], atol=1e-5)
    np.testing.assert_allclose(out.cache[S1], own["layers_1"]["__call__"][0], atol=1e-5)
    np.testing.assert_allclose(out.cache["blocks.0.hook_attn_out"], own["layers_0"]["attn"]["__call__"][0], atol=1e-5)
    np.testing.assert_allclose(out.cache["blocks.0.hook_mlp_out"], own["layers_0"]["mlp"]["__call__"][0], atol=1e-5)
    stopped = wrapped.run(TOKENS, capture=(S0,), stop_at=S0)
    assert stopped.logits is None
    np.testing.assert_allclose(stopped.cache[S0], out.cache[S0], atol=1e-6)


def test_linen_clamp_equals_hand_loop(linen_pair):
    module, variables, wrapped = linen_pair
    sae = random_sae(S0)
    want = module.apply(variables, TOKENS, sae, method=linen_by_hand)
    assert float(jnp.abs(want - module.apply(variables, TOKENS)).max()) > 1e-2
    np.testing.assert_allclose(wrapped.run(TOKENS, edits=(Clamp(sae, FEATURE, ALPHA),)).logits, want, atol=1e-4)


# ---------------------------------------------------------------- errors, before any work

class Pair(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        y = self.lin(x)
        return y, 2 * y


class TwoOutputs(nnx.Module):
    """A submodule (`pair`) that returns a tuple, and one (`shared`) called twice."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.pair = Pair(rngs)
        self.shared = nnx.Linear(4, 4, rngs=rngs)
        self.out = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, tokens):
        a, b = self.pair(self.embed(tokens))
        return self.out(self.shared(self.shared(a + b)))


def test_flax_errors_name_what_was_expected(nnx_pair):
    module, _ = nnx_pair
    with pytest.raises(SiteError, match=r"no submodule at path 'layers\.7'; expected one of \[.*'layers\.1\.mlp'"):
        jfig.Model.from_flax(module, sites={S0: "layers.7"})
    with pytest.raises(SiteError, match=r"\['resid'\] are not TransformerLens-style names.*site_order"):
        jfig.Model.from_flax(module, sites={"resid": "layers.0"})
    with pytest.raises(SiteError, match="site_order must list each site"):
        jfig.Model.from_flax(module, sites={"a": "layers.0", "b": "layers.1"}, site_order=("a",))
    with pytest.raises(SiteError, match="reaches its sites in the order"):
        jfig.Model.from_flax(module, sites={S0: "layers.1", S1: "layers.0"})
    with pytest.raises(SiteError, match="predicate holds for 2 submodules"):
        jfig.Model.from_flax(module, sites={S0: lambda path, m: isinstance(m, Block)})
    with pytest.raises(SiteError, match="reached 0 times"):
        jfig.Model.from_flax(module, sites={S0: "layers"})          # an nnx.List is never called
    odd = TwoOutputs(nnx.Rngs(0))
    with pytest.raises(SiteError, match="'pair' gives a tuple of 2 values, not a single array"):
        jfig.Model.from_flax(odd, sites={S0: "pair"})
    with pytest.raises(SiteError, match="reached 2 times"):
        jfig.Model.from_flax(odd, sites={S0: "shared"})
    with pytest.raises(JfigError, match="needs sites="):
        jfig.Model.from_flax(module, sites={})
    with pytest.raises(JfigError, match="flax.nnx.Module or a flax.linen.Module"):
        jfig.Model.from_flax(object(), sites={S0: "layers.0"})
    with pytest.raises(JfigError, match="does not match the module"):
        jfig.Model.from_flax(module, nnx.state(odd), sites={S0: "layers.0"})


class LinenPair(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4)(x)
        return {"a": y, "b": y}


class LinenOdd(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        d = LinenPair()(nn.Embed(10, 4)(tokens))
        return nn.Dense(10)(d["a"])


def test_linen_errors_name_what_was_expected(linen_pair):
    module, variables, _ = linen_pair
    with pytest.raises(SiteError, match=r"no submodule at path 'layers_9'; expected one of \[.*'layers_1'"):
        jfig.Model.from_flax(module, variables, sites={S0: "layers_9"})
    with pytest.raises(JfigError, match="holds no weights"):
        jfig.Model.from_flax(module, sites={S0: "layers_0"})
    odd = LinenOdd()
    v = odd.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(SiteError, match="'LinenPair_0' gives a dict with keys \\['a', 'b'\\], not a single array"):
        jfig.Model.from_flax(odd, v, sites={S0: "LinenPair_0"})
    wrapped = jfig.Model.from_flax(odd, v["params"], sites={S0: "LinenPair_0.Dense_0"})   # bare params work too
    assert wrapped.sites == (S0,) and wrapped.vocab_size == 10


@pz.pytree_dataclass
class SplitInTwo(pz.nn.Layer):
    def __call__(self, x, **side_inputs):
        return (x, x)


@pz.pytree_dataclass
class AddPair(pz.nn.Layer):
    def __call__(self, pair, **side_inputs):
        return pair[0] + pair[1]


def test_penzai_errors_name_what_was_expected(llamalike):
    pz_model, _, _ = llamalike
    blocks = lambda m: pz.select(m).at_instances_of(model_parts.TransformerBlock)  # noqa: E731
    with pytest.raises(SiteError, match=r"selects 2 layers \['\.body\.sublayers\[1\]', '\.body\.sublayers\[2\]'\]"):
        jfig.Model.from_penzai(pz_model, sites={S0: blocks})
    listing = r"outer layers are \['\.body', '\.body\.sublayers\[0\]'"
    with pytest.raises(SiteError, match=r"keypath '\.body\.sublayers\[9\]' selects 0 layers; .*" + listing):
        jfig.Model.from_penzai(pz_model, sites={S0: ".body.sublayers[9]"})
    with pytest.raises(SiteError, match="returned int; expected a pz.Selection"):
        jfig.Model.from_penzai(pz_model, sites={S0: lambda m: 3})
    with pytest.raises(SiteError, match="not TransformerLens-style names"):
        jfig.Model.from_penzai(pz_model, sites={"first": ".body.sublayers[1]"})
    with pytest.raises(JfigError, match="wraps a penzai layer"):
        jfig.Model.from_penzai({"not": "a model"})
    odd = pz.select(pz_model).at_instances_of(model_parts.TransformerBlock).pick_nth_selected(0).insert_after(
        pz.nn.Sequential([SplitInTwo(), AddPair()]))
    with pytest.raises(SiteError, match=r"layer at \.body\.sublayers\[2\]\.sublayers\[0\] gives a tuple of 2 values"):
        jfig.Model.from_penzai(odd, sites={S0: ".body.sublayers[2].sublayers[0]"})
    with pytest.raises(SiteError, match="found no TransformerBlock"):
        jfig.Model.from_penzai(pz.nn.Sequential([pz.nn.Identity()]))


def test_penzai_layer_stack_is_refused():
    cfg = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1, query_head_multiplier=2, embedding_dim=8, projection_dim=4, mlp_hidden_dim=8,
        num_decoder_blocks=2, vocab_size=20, mlp_variant="swiglu", tie_embedder_and_logits=True, use_layer_stack=True)
    stacked = llamalike_common.build_llamalike_transformer(cfg, init_base_rng=None)    # structure only
    with pytest.raises(SiteError, match="LayerStack.*use_layer_stack=False"):
        jfig.Model.from_penzai(stacked)


# ---------------------------------------------------------------- the page

def test_adapters_page_runs():
    """docs/adapters.md's code blocks run, top to bottom, as one script."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "adapters.md").read_text()
    blocks = [textwrap.dedent(b) for _, b in re.findall(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)]
    assert len(blocks) >= 6
    ns: dict = {}
    exec(compile("\n".join(blocks), "docs/adapters.md", "exec"), ns)
    assert ns["model"].sites[0] == "hook_embed" and ns["effects"].mean.shape == (2, 64)
    assert ns["custom"].sites == (S0, "blocks.1.hook_resid_pre", S1)
