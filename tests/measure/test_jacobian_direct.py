"""method="jacobian_direct" against an independent float64 reference.

jacobian_direct is ∂(target read-out)/∂α_i with attention patterns and norm scales held at their
clean values (stop_gradient in jfig's forward). The reference here is a plain numpy float64
forward of the tiny Llama (RMSNorm, RoPE, GQA causal attention, SwiGLU MLP) that can take those
patterns and scales as fixed inputs: with them fixed, a central finite difference in α_i of the
read-out, after adding α_i d_i at the clamp position of the source site, is the direct effect.
With nothing fixed, the same difference is the total effect that method="jacobian" measures.

Source blocks.0.hook_resid_post, targets at blocks.2.hook_resid_post: two attention layers and
two MLPs lie between, so both frozen quantities matter. Targets are read as encoder
pre-activations (read="pre"), which are linear in the target site: no ReLU kinks in the
difference quotient.

Tolerances: jfig runs in float32 (its norms and attention scores are computed in float32, and
per-input effects are returned as float32), so agreement is at float32 level, about 1e-7 of the
effects' size; the reference itself is float64 with a step of 1e-5, accurate to ~1e-10. We allow
1e-5 of the largest reference effect. Freezing changes every input's effects by at least ~3 % of
that size (up to ~65 %), over three orders of magnitude above it, so a jacobian_direct that ignored
the freeze, or froze only the patterns or only the scales, would fail.
"""
import jax
import numpy as np
import pytest

import jfig
from jfig.measure import measure_effects
from tests.support.tiny_models import tiny_model

SRC_SITE, TGT_SITE = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"
SRC_LAYER, TGT_LAYER = 0, 2
SOURCES = [0, 1, 2, 3]
N_TARGETS = 12
INPUTS = 3
STEP = 1e-5                 # float64 central difference: truncation ~STEP², rounding ~1e-16 / STEP
REL_TOL = 1e-5              # float32 jfig vs float64 reference, relative to the largest effect
MIN_GAP = 100 * REL_TOL     # how far a wrongly frozen reference must lie from the right one


# ----------------------------------------------------------------------------- numpy reference

def rms_scale(cfg, x):
    """RMSNorm's 1 / rms factor [s, 1]."""
    return 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)


def rotary(cfg, x):
    """HF rotate-half RoPE on x [s, heads, e] at positions 0..s-1."""
    s, e = x.shape[0], x.shape[-1]
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, e, 2) / e)
    angle = np.arange(s)[:, None] * inv_freq
    angle = np.concatenate([angle, angle], axis=-1)[:, None, :]
    half = e // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angle) + rotated * np.sin(angle)


def numpy_forward(cfg, params, tokens, *, add_at_source=None, patterns=None, scales=None):
    """Float64 forward of one sequence through blocks 0..TGT_LAYER of the tiny Llama.

    add_at_source [s, d] is added to blocks.SRC_LAYER.hook_resid_post. `patterns` {layer: [h, q, k]}
    and `scales` {(layer, "ln1"|"ln2"): [s, 1]} replace the attention patterns and RMSNorm 1/rms
    factors computed on the fly (a frozen run). Returns (resid_post {layer: [s, d]}, the patterns
    and scales this run used).
    """
    blocks = params["blocks"]
    n_heads, n_kv, d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    kv_of_head = np.arange(n_heads) // (n_heads // n_kv)
    causal = np.tril(np.ones((len(tokens), len(tokens)), bool))
    s = len(tokens)
    x = params["embed"][tokens] * cfg.embed_scale
    resid_post, used_patterns, used_scales = {}, {}, {}

    def normed(layer, name, x, w):
        scale = rms_scale(cfg, x) if scales is None else scales[(layer, name)]
        used_scales[(layer, name)] = scale
        return x * scale * w

    for layer in range(TGT_LAYER + 1):
        h = normed(layer, "ln1", x, blocks["ln1_w"][layer])
        q = rotary(cfg, (h @ blocks["W_q"][layer]).reshape(s, n_heads, d_head))
        k = rotary(cfg, (h @ blocks["W_k"][layer]).reshape(s, n_kv, d_head))[:, kv_of_head]
        v = (h @ blocks["W_v"][layer]).reshape(s, n_kv, d_head)[:, kv_of_head]
        if patterns is None:
            scores = np.einsum("qhe,khe->hqk", q, k) * cfg.q_scale
            scores = np.where(causal, scores, -np.inf)
            pattern = np.exp(scores - scores.max(-1, keepdims=True))
            pattern = pattern / pattern.sum(-1, keepdims=True)
        else:
            pattern = patterns[layer]
        used_patterns[layer] = pattern
        z = np.einsum("hqk,khe->qhe", pattern, v)
        x = x + z.reshape(s, n_heads * d_head) @ blocks["W_o"][layer]
        h = normed(layer, "ln2", x, blocks["ln2_w"][layer])
        gate = h @ blocks["W_gate"][layer]
        x = x + (gate / (1.0 + np.exp(-gate)) * (h @ blocks["W_up"][layer])) @ blocks["W_down"][layer]
        if add_at_source is not None and layer == SRC_LAYER:
            x = x + add_at_source
        resid_post[layer] = x
    return resid_post, used_patterns, used_scales


def sae_pre(sae, x):
    """Encoder pre-activations of a plain ReLU SAE, float64: (x - b_dec) W_enc + b_enc."""
    w_enc, b_enc, b_dec = (np.asarray(a, np.float64) for a in (sae.W_enc, sae.b_enc, sae.b_dec))
    return (x - b_dec) @ w_enc + b_enc


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def case():
    """A 3-layer tiny Llama (float32, as jfig runs it), random ReLU SAEs at the source and target
    sites, 8 sequences of 6 tokens, and the parameters as float64 numpy arrays."""
    model = tiny_model("llama", n_layers=3)
    src = jfig.SAE.init_random(jax.random.PRNGKey(1), 16, 24, SRC_SITE)
    tgt = jfig.SAE.init_random(jax.random.PRNGKey(2), 16, N_TARGETS, TGT_SITE)
    tokens = np.random.default_rng(0).integers(0, 50, size=(8, 6))
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), model.params)
    return model, src, tgt, tokens, params


def reference_effects(case, tokens, feature, positions):
    """Central differences [N_TARGETS] at one input of the read-out w.r.t. α (α d_feature added at the
    source's strongest position): with patterns and scales frozen, with neither, and with only one."""
    model, src, tgt, _, params = case
    cfg = model.config
    clean, patterns, scales = numpy_forward(cfg, params, tokens)
    f = np.maximum(sae_pre(src, clean[SRC_LAYER])[:, feature], 0.0)
    top2 = np.sort(f)[-2:]
    assert top2[1] > 0 and top2[1] - top2[0] > 1e-4, "clamp position must not hinge on float32 rounding"
    clamp = int(np.argmax(f))
    where = np.arange(len(tokens))
    read = where == clamp if positions == "same" else where > clamp
    direction = np.asarray(src.W_dec[feature], np.float64)

    def read_out(alpha, **frozen):
        delta = np.zeros((len(tokens), cfg.d_model))
        delta[clamp] = alpha * direction
        post = numpy_forward(cfg, params, tokens, add_at_source=delta, **frozen)[0]
        return sae_pre(tgt, post[TGT_LAYER])[read].mean(0)

    def slope(**frozen):
        return (read_out(STEP, **frozen) - read_out(-STEP, **frozen)) / (2 * STEP)

    return dict(direct=slope(patterns=patterns, scales=scales), total=slope(),
                patterns_only=slope(patterns=patterns), scales_only=slope(scales=scales))


# ----------------------------------------------------------------------------- tests

def test_numpy_forward_reproduces_jfig_clean_run(case):
    """The reference forward is the same model: residuals at the source and target sites and the
    attention patterns it would freeze agree with jfig's run to float32 precision (jfig computes
    norms and attention scores in float32; observed ~7e-7 on residuals of size ~4, ~2e-7 on patterns)."""
    model, _, _, tokens, params = case
    pattern_sites = [f"blocks.{l}.attn.hook_pattern" for l in (1, 2)]
    out = model.run(tokens, capture=(SRC_SITE, TGT_SITE, *pattern_sites)).cache
    for row, toks in enumerate(tokens):
        posts, patterns, _ = numpy_forward(model.config, params, toks)
        for layer, site in ((SRC_LAYER, SRC_SITE), (TGT_LAYER, TGT_SITE)):
            np.testing.assert_allclose(out[site][row], posts[layer], rtol=0, atol=1e-5)
        for layer, site in zip((1, 2), pattern_sites):
            np.testing.assert_allclose(out[site][row], patterns[layer], rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions,mode", [("same", "reverse"), ("later", "forward")])
def test_jacobian_direct_is_the_frozen_finite_difference(case, positions, mode):
    """Per input, jacobian_direct equals the float64 central difference of the model with clean
    attention patterns and norm scales frozen, and jacobian equals it with nothing frozen. The
    frozen and unfrozen references, and those freezing only patterns or only scales, lie far apart
    (≥ MIN_GAP of the largest effect), so each match pins down what is frozen. Forward mode (one jvp
    per source) and reverse mode (one vjp per target and position) are the two code paths to it."""
    model, src, tgt, tokens, _ = case
    measured = {method: measure_effects(model, [src, tgt], {SRC_SITE: SOURCES}, tokens, method=method,
                                        positions=positions, clamp_at="single", read="pre",
                                        targets={TGT_SITE: range(N_TARGETS)}, inputs_per_source=INPUTS,
                                        keep_per_input=True, mode=mode, progress=False)
                for method in ("jacobian_direct", "jacobian")}
    eff = measured["jacobian_direct"]
    np.testing.assert_array_equal(eff.input_index, measured["jacobian"].input_index)
    np.testing.assert_array_equal(eff.input_weight, measured["jacobian"].input_weight)
    got_direct, got_total, refs = [], [], []
    for r, (_, feature) in enumerate(eff.sources):
        for m in range(INPUTS):
            if eff.input_weight[r, m] == 0:     # padding, or nothing to read after the clamp
                continue
            refs.append(reference_effects(case, tokens[eff.input_index[r, m]], feature, positions))
            got_direct.append(eff.per_input[r, m])
            got_total.append(measured["jacobian"].per_input[r, m])
    assert len(refs) >= 6, f"only {len(refs)} inputs to compare"
    ref = {key: np.stack([x[key] for x in refs]) for key in refs[0]}
    tol = REL_TOL * np.abs(ref["direct"]).max()
    np.testing.assert_allclose(np.stack(got_direct), ref["direct"], rtol=0, atol=tol)
    np.testing.assert_allclose(np.stack(got_total), ref["total"], rtol=0, atol=REL_TOL * np.abs(ref["total"]).max())
    size = np.abs(ref["direct"]).max()
    gap = {wrong: np.abs(ref[wrong] - ref["direct"]).max(axis=1) for wrong in ("total", "patterns_only", "scales_only")}
    assert gap["total"].min() > MIN_GAP * size            # on every input, freezing changes the effect
    for partial in ("patterns_only", "scales_only"):     # a clamp at position 0, read there, has no pattern
        assert gap[partial].max() > MIN_GAP * size        # to move: there only the scales matter
