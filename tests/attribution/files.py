"""Files the attribution tests share with circuit-tracer: a tiny HF model folder with a tokenizer, and
transcoders in circuit-tracer's formats (per-layer `layer_{i}.safetensors`, cross-layer
`W_enc_{i}` / `W_dec_{i}`), written once and read by both jfig and the reference script."""
import json

import numpy as np
import yaml
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tests.support.hf_reference import tiny_hf


def write_model(folder, family: str, **over):
    """A tiny random HF model of `family` with a byte-level tokenizer (<pad> 0, <s> 1, </s> 2): BOS is
    not 0, so circuit-tracer puts BOS in front of a prompt."""
    kv = 2 if family != "gpt2" else 4
    if family == "gpt2":
        over.setdefault("n_ctx", 64)      # TransformerLens reads n_ctx, which GPT2Config no longer sets
    model, cfg = tiny_hf(family, n_heads=4, n_kv_heads=kv, **over)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet())[:94]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return cfg


def write_transcoders(folder, n_layers: int, d: int, d_tc: int, *, seed=0, skip=False, jumprelu=False,
                      hooks=("mlp.hook_in", "mlp.hook_out")):
    """circuit-tracer per-layer transcoders (file orientation: W_enc [d_tc, d], W_skip [d, d] used as x @ W_skip.T)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n_layers):
        t = {"W_enc": rng.normal(size=(d_tc, d)) / np.sqrt(d), "b_enc": rng.normal(size=d_tc) * 0.2,
             "W_dec": rng.normal(size=(d_tc, d)) / np.sqrt(d_tc), "b_dec": rng.normal(size=d) * 0.1}
        if skip:
            t["W_skip"] = rng.normal(size=(d, d)) * 0.1
        if jumprelu:
            t["activation_function.threshold"] = rng.uniform(-0.1, 0.3, d_tc)
        save_file({k: np.asarray(v, np.float32) for k, v in t.items()}, str(folder / f"layer_{i}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "transcoder_set", "feature_input_hook": hooks[0],
                                                        "feature_output_hook": hooks[1]}))
    return folder


def write_clt(folder, n_layers: int, d: int, d_tc: int, *, seed=0, hooks=("hook_resid_mid", "hook_mlp_out")):
    """A circuit-tracer cross-layer transcoder (JumpReLU), layer i writing layers i..n-1."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n_layers):
        enc = {f"W_enc_{i}": rng.normal(size=(d_tc, d)) / np.sqrt(d), f"b_enc_{i}": rng.normal(size=d_tc) * 0.2,
               f"b_dec_{i}": rng.normal(size=d) * 0.1, f"threshold_{i}": rng.uniform(-0.1, 0.3, d_tc)}
        save_file({k: np.asarray(v, np.float32) for k, v in enc.items()}, str(folder / f"W_enc_{i}.safetensors"))
        dec = rng.normal(size=(d_tc, n_layers - i, d)) / np.sqrt(d_tc)
        save_file({f"W_dec_{i}": dec.astype(np.float32)}, str(folder / f"W_dec_{i}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder",
                                                        "feature_input_hook": hooks[0],
                                                        "feature_output_hook": hooks[1]}))
    return folder
