"""Model files end to end: GGUF (F32 and quantised) and HF safetensors folders -> jfig.load_model.

Each GGUF is written here with gguf-py's GGUFWriter the way llama.cpp's converter lays out a
tiny random HF model (same metadata keys, tensor names, Llama Q/K row permutation, Gemma-2
norms stored as 1 + w, GPT-2 Conv1D weights transposed); the loaded model must reproduce the
HF model's logits. The error tests check that every broken file is reported as a FormatError
that names the file and the field, tensor or parameter at fault.
"""
import json
import shutil

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

import jfig
from jfig.errors import FormatError
from jfig.models.gguf_loader import unpermute_qk

from tests.support.hf_reference import state_dict_numpy, tiny_hf

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 11))  # [batch, seq]; 11 > gemma2's window 4


def _jfig_logits(path) -> np.ndarray:
    return np.asarray(jfig.load_model(str(path)).run(jnp.asarray(TOKENS)).logits)  # [batch, seq, vocab]


def _hf_logits(model_hf) -> np.ndarray:
    return model_hf(torch.as_tensor(TOKENS)).logits.numpy()


# ---------------------------------------------------------------- writing GGUF like llama.cpp


def _llamacpp_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (rotate_half) row order -> Meta's interleaved order, as llama.cpp writes attn_q/attn_k.

    Within each head of size hd, HF row c*hd/2 + j (c in {0, 1}) becomes row 2j + c.
    """
    hd = w.shape[0] // n_heads
    src = np.empty(w.shape[0], dtype=np.int64)  # GGUF row -> HF row
    for h in range(n_heads):
        for j in range(hd // 2):
            for c in range(2):
                src[h * hd + 2 * j + c] = h * hd + c * (hd // 2) + j
    return w[src]


def _gguf_tensors(family: str, sd: dict, cfg: dict) -> dict[str, np.ndarray]:
    """llama.cpp tensor names -> float32 arrays in numpy (out, in) order."""
    t: dict[str, np.ndarray] = {}
    if family == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        t["token_embd.weight"], t["position_embd.weight"] = sd["wte.weight"], sd["wpe.weight"]
        for i in range(cfg["n_layer"]):
            h, b = f"h.{i}.", f"blk.{i}."
            for gg, hf in [("attn_norm", "ln_1"), ("ffn_norm", "ln_2")]:
                t[b + gg + ".weight"], t[b + gg + ".bias"] = sd[h + hf + ".weight"], sd[h + hf + ".bias"]
            for gg, hf in [("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
                           ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]:
                t[b + gg + ".weight"] = sd[h + hf + ".weight"].T  # Conv1D [in, out] -> [out, in]
                t[b + gg + ".bias"] = sd[h + hf + ".bias"]
        t["output_norm.weight"], t["output_norm.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
        return {k: np.ascontiguousarray(v, np.float32) for k, v in t.items()}

    gemma = family == "gemma2"
    shift = 1.0 if gemma else 0.0  # llama.cpp stores Gemma norm weights as 1 + w
    t["token_embd.weight"] = sd["model.embed_tokens.weight"]
    names = [("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]
    names += ([("ffn_norm", "pre_feedforward_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
               ("post_ffw_norm", "post_feedforward_layernorm")] if gemma else
              [("ffn_norm", "post_attention_layernorm")])
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for gg, hf in names:
            w = sd[p + hf + ".weight"]
            t[b + gg + ".weight"] = w + shift if gg.endswith("norm") else w
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if not gemma:  # the Llama family is permuted, the NEOX group (Gemma) is not
            q = _llamacpp_qk_rows(q, cfg["num_attention_heads"])
            k = _llamacpp_qk_rows(k, cfg["num_key_value_heads"])
        t[b + "attn_q.weight"], t[b + "attn_k.weight"] = q, k
    t["output_norm.weight"] = sd["model.norm.weight"] + shift
    if not cfg["tie_word_embeddings"]:
        t["output.weight"] = sd["lm_head.weight"]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in t.items()}


def _write_metadata(w: gguf.GGUFWriter, family: str, cfg: dict) -> None:
    if family == "gpt2":
        w.add_block_count(cfg["n_layer"])
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_feed_forward_length(4 * cfg["n_embd"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
        return
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if family == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
        w.add_rope_dimension_count(cfg["head_dim"])
    else:  # gemma2: head_dim explicit, soft-caps and window; query_pre_attn_scalar has no key
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])


def _write_gguf(path, arch: str, family: str | None, cfg: dict, tensors: dict, qtypes: dict | None = None):
    """Write a GGUF file; `qtypes` maps tensor name -> GGMLQuantizationType to store it quantised."""
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)  # also writes general.architecture
    w.add_name(f"tiny-{arch}")
    if family is not None:
        _write_metadata(w, family, cfg)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtypes else gguf.LlamaFileType.ALL_F32)
    for name, arr in tensors.items():
        if name in qtypes:
            w.add_tensor(name, quantize(arr, qtypes[name]), raw_dtype=qtypes[name])
        else:
            w.add_tensor(name, arr)
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_for_gguf(family: str):
    """tiny_hf's model, except that Gemma-2 uses query_pre_attn_scalar = head_dim.

    A GGUF cannot store query_pre_attn_scalar and llama.cpp uses head_dim, so the HF reference
    must too; the weights are tiny_hf's.
    """
    model_hf, cfg = tiny_hf(family, n_heads=4, n_kv_heads=4 if family == "gpt2" else 2)
    if family == "gemma2":
        cfg = dict(cfg, query_pre_attn_scalar=cfg["head_dim"])
        ref = transformers.Gemma2ForCausalLM(transformers.Gemma2Config.from_dict(cfg)).float().eval()
        ref.load_state_dict(model_hf.state_dict())
        model_hf = ref
    return model_hf, cfg


def test_llamacpp_permutation_is_what_the_loader_undoes():
    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    for n_heads in (1, 2, 4):
        np.testing.assert_array_equal(unpermute_qk(_llamacpp_qk_rows(w, n_heads), n_heads), w)


# ---------------------------------------------------------------- GGUF round trips


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_f32_gguf_matches_hf(tmp_path, family):
    model_hf, cfg = _tiny_for_gguf(family)
    assert family != "gemma2" or cfg["query_pre_attn_scalar"] == cfg["head_dim"]
    tensors = _gguf_tensors(family, state_dict_numpy(model_hf), cfg)
    path = _write_gguf(tmp_path / f"{family}.gguf", family, family, cfg, tensors)
    np.testing.assert_allclose(_jfig_logits(path), _hf_logits(model_hf), atol=1e-5, rtol=0)


def test_gpt2_gguf_with_separate_output_tensor(tmp_path):
    """Older llama.cpp GPT-2 conversions also wrote token_embd as output.weight."""
    model_hf, cfg = _tiny_for_gguf("gpt2")
    tensors = _gguf_tensors("gpt2", state_dict_numpy(model_hf), cfg)
    tensors["output.weight"] = tensors["token_embd.weight"].copy()
    path = _write_gguf(tmp_path / "gpt2-out.gguf", "gpt2", "gpt2", cfg, tensors)
    model = jfig.load_model(str(path))
    assert not model.config.tied_embeddings
    np.testing.assert_allclose(np.asarray(model.run(jnp.asarray(TOKENS)).logits), _hf_logits(model_hf),
                               atol=1e-5, rtol=0)


# Llama GGUF tensor -> HF parameter, for the weights stored quantised (input dims are 32 = one block).
QUANTISED = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantised_llama_gguf_matches_hf_on_dequantised_weights(tmp_path, qtype):
    """Quantisation blocks run along the input dim, so they commute with the Q/K row un-permutation."""
    qt = gguf.GGMLQuantizationType[qtype]
    model_hf, cfg = _tiny_for_gguf("llama")
    block, _ = gguf.GGML_QUANT_SIZES[qt]
    assert cfg["hidden_size"] % block == 0 and cfg["num_attention_heads"] * cfg["head_dim"] % block == 0
    sd = state_dict_numpy(model_hf)
    tensors = _gguf_tensors("llama", sd, cfg)
    qtypes = {f"blk.{i}.{gg}.weight": qt for i in range(cfg["num_hidden_layers"]) for gg in QUANTISED}
    qtypes["token_embd.weight"] = qtypes["output.weight"] = qt
    path = _write_gguf(tmp_path / f"llama-{qtype}.gguf", "llama", "llama", cfg, tensors, qtypes)

    # The reference: the same HF model with those weights replaced by dequantize(quantize(w)).
    hf_names = {f"blk.{i}.{gg}.weight": f"model.layers.{i}.{hf}.weight"
                for i in range(cfg["num_hidden_layers"]) for gg, hf in QUANTISED.items()}
    hf_names.update({"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"})
    params = dict(model_hf.named_parameters())
    changed = 0.0
    for gg, hf in hf_names.items():
        w = sd[hf].astype(np.float32)
        wq = dequantize(quantize(w, qt), qt).reshape(w.shape)
        changed = max(changed, float(np.abs(wq - w).max()))
        params[hf].copy_(torch.from_numpy(wq))
    assert changed > 1e-4  # the quantisation is not a no-op, so the comparison means something
    np.testing.assert_allclose(_jfig_logits(path), _hf_logits(model_hf), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- HF folders


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_hf_folder_matches_hf(tmp_path, family):
    model_hf, _ = tiny_hf(family, n_heads=4, n_kv_heads=4 if family == "gpt2" else 2)
    model_hf.save_pretrained(tmp_path, safe_serialization=True)
    np.testing.assert_allclose(_jfig_logits(tmp_path), _hf_logits(model_hf), atol=1e-5, rtol=0)


def test_sharded_hf_folder_matches_hf(tmp_path):
    model_hf, _ = tiny_hf("llama", n_heads=4, n_kv_heads=2)
    model_hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    np.testing.assert_allclose(_jfig_logits(tmp_path), _hf_logits(model_hf), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_hf_folder_loads(tmp_path, family):
    model_hf, _ = tiny_hf(family, n_heads=4, n_kv_heads=4 if family == "gpt2" else 2)
    model_hf.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    model_hf.float()  # now an f32 model holding the bf16-rounded weights
    np.testing.assert_allclose(_jfig_logits(tmp_path), _hf_logits(model_hf), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- errors


@pytest.fixture
def llama_gguf_parts():
    model_hf, cfg = _tiny_for_gguf("llama")
    return cfg, _gguf_tensors("llama", state_dict_numpy(model_hf), cfg)


def test_truncated_gguf(tmp_path, llama_gguf_parts):
    path = _write_gguf(tmp_path / "t.gguf", "llama", "llama", *llama_gguf_parts)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])  # cut inside the tensor data
    with pytest.raises(FormatError, match=r"t\.gguf.*truncated"):
        jfig.load_model(str(path))


def test_gguf_missing_tensor(tmp_path, llama_gguf_parts):
    cfg, tensors = llama_gguf_parts
    del tensors["blk.1.ffn_up.weight"]
    path = _write_gguf(tmp_path / "m.gguf", "llama", "llama", cfg, tensors)
    with pytest.raises(FormatError, match=r"m\.gguf.*'blk\.1\.ffn_up\.weight' is missing"):
        jfig.load_model(str(path))


def test_gguf_missing_metadata_key(tmp_path, llama_gguf_parts):
    cfg, tensors = llama_gguf_parts
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(cfg["hidden_size"])
    w.add_head_count(cfg["num_attention_heads"])  # no llama.block_count
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    _finish(w)
    with pytest.raises(FormatError, match=r"k\.gguf.*'llama\.block_count'"):
        jfig.load_model(str(path))


@pytest.mark.parametrize("name,shape,message", [
    # one layer's tensor wrong: named by layer and parameter, with the shape the config implies
    ("blk.1.attn_v.weight", (24, 32), r"layer 1.*blocks\.W_v.*\(32, 24\).*expected \(32, 16\)"),
    # the same tensor wrong in every layer
    ("blk.*.ffn_down.weight", (32, 40), r"blocks\.W_down.*expected \(48, 32\)"),
    ("output_norm.weight", (31,), r"ln_f_w.*\(31,\).*expected \(32,\)"),
])
def test_gguf_wrong_shape(tmp_path, llama_gguf_parts, name, shape, message):
    cfg, tensors = llama_gguf_parts
    for n in [k for k in tensors if k == name or (name.startswith("blk.*") and k.endswith(name[5:]))]:
        tensors[n] = np.zeros(shape, np.float32)
    path = _write_gguf(tmp_path / "s.gguf", "llama", "llama", cfg, tensors)
    with pytest.raises(FormatError, match=r"s\.gguf.*" + message):
        jfig.load_model(str(path))


def test_gguf_unsupported_architecture(tmp_path):
    """A Mamba GGUF, with the keys llama.cpp writes for it (head_count 0, no attention)."""
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(4)
    w.add_ssm_inner_size(64)
    w.add_ssm_state_size(16)
    w.add_ssm_time_step_rank(2)
    w.add_tensor("token_embd.weight", np.zeros((97, 32), np.float32))
    _finish(w)
    with pytest.raises(FormatError, match=r"mamba\.gguf.*'mamba' is not supported"):
        jfig.load_model(str(path))


@pytest.fixture
def hf_folder(tmp_path):
    model_hf, _ = tiny_hf("llama", n_heads=4, n_kv_heads=2)
    folder = tmp_path / "tiny-llama"
    model_hf.save_pretrained(folder, safe_serialization=True)
    return folder


def test_hf_folder_without_config(hf_folder):
    (hf_folder / "config.json").unlink()
    with pytest.raises(FormatError, match=r"tiny-llama.*no config\.json"):
        jfig.load_model(str(hf_folder))


def test_hf_config_missing_key(hf_folder):
    raw = json.loads((hf_folder / "config.json").read_text())
    del raw["num_hidden_layers"]
    (hf_folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"config\.json.*'num_hidden_layers'"):
        jfig.load_model(str(hf_folder))


def test_truncated_safetensors(hf_folder):
    f = hf_folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated"):
        jfig.load_model(str(hf_folder))


def test_hf_wrong_shape_in_one_layer(hf_folder):
    from safetensors.numpy import load_file
    sd = load_file(str(hf_folder / "model.safetensors"))
    sd["model.layers.2.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
    save_file(sd, str(hf_folder / "model.safetensors"))
    with pytest.raises(FormatError, match=r"tiny-llama.*layer 2.*blocks\.W_up.*expected \(32, 48\)"):
        jfig.load_model(str(hf_folder))


def test_index_names_missing_shard(tmp_path):
    model_hf, _ = tiny_hf("llama", n_heads=4, n_kv_heads=2)
    model_hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / gone).unlink()
    with pytest.raises(FormatError, match=gone.replace(".", r"\.") + ".*missing"):
        jfig.load_model(str(tmp_path))


def test_no_such_path():
    with pytest.raises(FormatError, match=r"'no/such/path'.*neither a known name"):
        jfig.load_model("no/such/path")


def test_file_that_is_not_a_gguf(tmp_path):
    shutil.copyfile(__file__, tmp_path / "fake.gguf")
    with pytest.raises(FormatError, match=r"fake\.gguf is not a GGUF file"):
        jfig.load_model(str(tmp_path / "fake.gguf"))
