"""A tiny project on disk: a Llama HF folder with a byte-level tokenizer.json, two SAEs and a text corpus
(the command-line and explorer tests run jfig on it as a user would)."""
import json

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import jfig
from tests.support.hf_reference import tiny_hf

SAE_SITES = ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")


def make_project(root):
    """(root, model): root/model (HF folder), root/saes/l0 and l2 (16 features each), root/texts."""
    model_hf, _ = tiny_hf("llama", n_heads=4, n_kv_heads=2)
    model_hf.save_pretrained(root / "model", safe_serialization=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet)[:95]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(root / "model" / "tokenizer.json"))
    (root / "model" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    model = jfig.load_model(root / "model")
    for i, site in enumerate(SAE_SITES):
        layer = jfig.sites.parse_site(site).layer
        jfig.save_sae(jfig.SAE.init_random(jax.random.PRNGKey(i), 32, 16, site), root / "saes" / f"l{layer}")
    (root / "texts").mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "a", "sequence", "of", "words"]
    for d in range(4):
        (root / "texts" / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 400)))
    return root, model
