"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers on the same file."""

import jax.numpy as jnp
import numpy as np
import pytest

import jfig

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "Ünïcödé text, 日本語 and emoji 🙂 — still fine?",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from jfig.models.default_model import default_gguf_path
    path = default_gguf_path()
    torch.set_grad_enabled(False)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model():
    return jfig.load_model("smollm2-135m")


def test_config(model):
    c = model.config
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 64, 49152)
    assert c.tied_embeddings


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hf_gguf(model, hf_model, prompt):
    import torch
    ids = model.tokenizer.encode(prompt)
    ref = hf_model(torch.tensor([ids]), output_hidden_states=True)
    ref_logits = ref.logits.numpy()
    out = model.run(jnp.asarray([ids]), capture=("blocks.10.hook_resid_post",))
    logits = np.asarray(out.logits)
    rel = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    assert rel <= 1e-4, rel
    h = ref.hidden_states[11].numpy()
    assert np.abs(np.asarray(out.cache["blocks.10.hook_resid_post"]) - h).max() / np.abs(h).max() <= 1e-4


def test_predicts_paris(model):
    ids = model.tokenizer.encode("The capital of France is")
    logits = model.run(jnp.asarray([ids])).logits
    assert model.tokenizer.decode([int(logits[0, -1].argmax())]).strip() == "Paris"


def test_position_sparse_effects_equal_the_full_suffix(model):
    """On SmolLM2 (GQA, RoPE, 30 layers), the clamped token alone against the clean keys/values gives the
    full suffix's effects for a few sources, two sites downstream."""
    import jax
    src, tgt = "blocks.6.hook_resid_post", "blocks.9.hook_resid_post"
    saes = [jfig.SAE.init_random(jax.random.PRNGKey(i), 576, 512, s, "topk", k=16) for i, s in enumerate((src, tgt))]
    toks = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(6, 24))
    kw = dict(inputs_per_source=4, keep_per_input=True, progress=False, read="pre")
    sparse = jfig.measure_effects(model, saes, {src: [0, 1, 2]}, toks, **kw)
    full = jfig.measure_effects(model, saes, {src: [0, 1, 2]}, toks, sparse=False, **kw)
    scale = float(np.nanmax(np.abs(full.per_input)))
    assert scale > 1e-3
    np.testing.assert_allclose(sparse.per_input, full.per_input, rtol=0, atol=1e-4 * scale)
