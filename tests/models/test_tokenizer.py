"""Tokenizer parity with HF transformers' GGUF tokenizer: the real SmolLM2 file, and tiny
synthetic GGUFs covering SentencePiece (Llama, Gemma, Phi-3) and byte-level BPE with a
pre-tokenizer split."""

import json
import pickle

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jfig.errors import FormatError, JfigError
from jfig.models.default_model import default_gguf_path
from jfig.models.gguf_reader import read_gguf
import jfig.models.tokenizer as tokenizer_module
from jfig.models.tokenizer import (GPT2_REGEX_PRE_TOKENIZERS, PRE_TOKENIZER_SPLITS, SUPPORTED_PRE_TOKENIZERS, Tokenizer,
                                   UnknownTokenError, byte_alphabet)

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12345 3.14159",
    "1,000,000 and 2024-01-01T12:00:00Z",
    "a  b   c    d",
    "   leading and trailing   ",
    "line one\nline two\n\n\nthree",
    "tab\tseparated\t\tvalues\r\nwindows",
    "café, naïve, über, Größe, é",
    "日本語のテキスト",
    "emoji 🙂👍🏽 and 🇫🇷",
    "مرحبا بالعالم",
    "Привет, мир!",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "if (a != b && c >= 0) { x->y[i] = 0x1F; }",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|>",
    "don't you'll we've I'M",
    "",
    " ",
    "\n",
    "ĠĊ literal byte-alphabet characters",
]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? Answer in 日本語."},
]


def hf_from_gguf(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm_path():
    return default_gguf_path()


@pytest.fixture(scope="module")
def tok(smollm_path):
    return Tokenizer.from_gguf(read_gguf(smollm_path))


@pytest.fixture(scope="module")
def hf(smollm_path):
    return hf_from_gguf(smollm_path)


@pytest.mark.slow
def test_smollm_attributes(tok, hf):
    assert tok.vocab_size == len(hf) == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 2, 0)
    assert tok.add_bos is False and tok.add_eos is False
    assert tok.chat_template.startswith("{% for message in messages %}")
    assert tok.id_to_token(1) == "<|im_start|>" and tok.token_to_id("<|im_end|>") == 2
    assert tok.token_to_id("Ġthe") == hf.convert_tokens_to_ids("Ġthe")


@pytest.mark.slow
@pytest.mark.parametrize("text", PROMPTS)
def test_smollm_ids_match_hf(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert tok.decode(ids) == text == hf.decode(ids)


@pytest.mark.slow
def test_smollm_bos_and_batch(tok):
    ids = tok.encode("Hello world")
    assert tok.encode("Hello world", add_bos=True) == [tok.bos_id, *ids]
    assert tok.encode("Hello world", add_bos=False) == ids
    assert tok.encode_batch(PROMPTS) == [tok.encode(t) for t in PROMPTS]
    assert tok.encode_batch(PROMPTS[:3], add_bos=True) == [tok.encode(t, add_bos=True) for t in PROMPTS[:3]]
    assert tok.decode(np.array(ids)) == "Hello world"
    assert tok.decode([tok.bos_id, *ids], skip_special=True) == "Hello world"


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm_chat_template_matches_hf(tok, hf, add_generation_prompt):
    for messages in (CHAT, CHAT[1:2]):  # with and without a system message
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False)
        assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == ids
        assert tok.encode(text, add_bos=False) == ids


_PIECES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["<|im_start|>", "<|im_end|>", " ", "  ", "\n", "\t", "123", "é", "🙂", "'s"]),
)


@pytest.mark.slow
@settings(max_examples=50, deadline=None)
@given(text=st.lists(_PIECES, max_size=6).map("".join))
def test_smollm_random_text_matches_hf(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    # SmolLM2's vocabulary lacks 21 of the 256 byte tokens (e.g. 0xF1, 0x04); BPE without an
    # unknown token drops such bytes, in HF as here. Other text comes back exactly.
    spell = byte_alphabet()
    if all(tok.backend.token_to_id(spell[b]) is not None for b in text.encode("utf-8")):
        assert tok.decode(ids) == text


@pytest.mark.slow
def test_tokenizer_pickles_and_hashes_by_identity(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("pickled 🙂") == tok.encode("pickled 🙂")
    assert (again.bos_id, again.chat_template) == (tok.bos_id, tok.chat_template)
    assert hash(tok) == hash(tok) and tok == tok and again != tok


@pytest.mark.slow
def test_unknown_tokens_raise(tok):
    with pytest.raises(UnknownTokenError, match="not in the vocabulary"):
        tok.token_to_id("definitely-not-a-token")
    with pytest.raises(UnknownTokenError, match="49152"):
        tok.id_to_token(49152)
    with pytest.raises(UnknownTokenError, match="outside the vocabulary"):
        tok.decode([5, 10**6])


@pytest.mark.slow
def test_from_file_matches_hf_save_pretrained(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("x y") == loaded.encode("x y")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (1, 2, 2, False)
    assert loaded.chat_template == hf.chat_template
    for text in PROMPTS:
        assert loaded.encode(text) == hf(text)["input_ids"]
    assert loaded.encode_chat(CHAT) == hf.apply_chat_template(CHAT, tokenize=True, return_dict=False)


# ----------------------------------------------------------------------------- synthetic GGUFs

_MODEL_KEYS = [("block_count", 1), ("context_length", 64), ("embedding_length", 8),
               ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2)]


def _writer(path, arch):
    w = gguf.GGUFWriter(str(path), arch)
    for name, value in _MODEL_KEYS:
        getattr(w, f"add_{name}")(value)
    w.add_layer_norm_rms_eps(1e-5)
    return w


def _finish(w):
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_sentencepiece_gguf(path, arch="llama", add_bos=None):
    """<unk>, <s>, </s>, 256 byte tokens, scored pieces, a control and a user-defined token."""
    tokens, types, scores = ["<unk>", "<s>", "</s>"], [2, 3, 3], [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>"); types.append(6); scores.append(0.0)
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "llo", "▁hel", "▁hello",
              "▁w", "▁wo", "▁wor", "or", "▁world", "ld", "a", "b", "c", "ab", "abc", "▁a", "é",
              "▁▁", "▁▁▁", "  ", "1", "2", "12", "▁1"]
    for i, piece in enumerate(pieces):
        tokens.append(piece); types.append(1); scores.append(-float(i) - (i % 3) * 0.5)
    tokens += ["<ctrl>", "<user>"]; types += [3, 4]; scores += [0.0, 0.0]
    w = _writer(path, arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens); w.add_token_types(types); w.add_token_scores(scores)
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    _finish(w)
    return path


def write_byte_level_gguf(path, pre):
    """256 byte tokens, a few merges, control/user-defined tokens, two spelled outside the
    byte alphabet (one control: HF skips it; one user-defined: not in the vocabulary)."""
    spell = byte_alphabet()
    tokens, types = [spell[b] for b in range(256)], [1] * 256
    merges = ["Ġ t", "Ġ h", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
              "12 3", "Ġ Ġ", "ĠĠ Ġ", "Ċ Ċ"]
    tokens += [m.replace(" ", "") for m in merges]; types += [1] * len(merges)
    tokens += ["<|begin|>", "<|end|>", "<think>", "bad control", "user word"]
    types += [3, 3, 4, 3, 4]
    w = _writer(path, "llama")
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens); w.add_token_types(types); w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin|>")); w.add_eos_token_id(tokens.index("<|end|>"))
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}"
                        "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    _finish(w)
    return path


SYNTHETIC_TEXTS = [
    "hello world", "  hello <s>world</s> <ctrl><user>", "xyz é", "<unk>", "hello\nworld",
    "12 123 1234 12345", "the world  thee   w", "a\t\tb\n\n\nc", "日本 🙂", "", " ",
    "<|begin|>the<|end|><think>x</think> bad control user word", "héllo wörld ab abc",
]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_sentencepiece_gguf_matches_hf(tmp_path, arch):
    path = write_sentencepiece_gguf(tmp_path / f"spm_{arch}.gguf", arch)
    ours, theirs = Tokenizer.from_gguf(path), hf_from_gguf(path)
    assert ours.add_bos is True and ours.bos_id == 1
    backend_ours = json.loads(ours.backend.to_str())
    backend_hf = json.loads(theirs.backend_tokenizer.to_str())
    assert backend_ours["model"] == backend_hf["model"]  # vocab and merges from the scores
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert backend_ours[key] == backend_hf[key], key
    for text in SYNTHETIC_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.encode("hello", add_bos=False) == theirs("hello", add_special_tokens=False)["input_ids"]


def test_sentencepiece_add_bos_flag_is_read(tmp_path):
    path = write_sentencepiece_gguf(tmp_path / "nobos.gguf", add_bos=False)
    ours = Tokenizer.from_gguf(path)
    assert ours.add_bos is False
    assert ours.encode("hello") == hf_from_gguf(path)("hello")["input_ids"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o", "smollm", "default"])
def test_byte_level_gguf_matches_hf(tmp_path, pre):
    path = write_byte_level_gguf(tmp_path / f"bpe_{pre}.gguf", pre)
    ours, theirs = Tokenizer.from_gguf(path), hf_from_gguf(path)
    backend_ours = json.loads(ours.backend.to_str())
    backend_hf = json.loads(theirs.backend_tokenizer.to_str())
    assert backend_ours["model"] == backend_hf["model"]
    assert backend_ours["pre_tokenizer"] == backend_hf["pre_tokenizer"]
    assert ours.add_bos is True
    for text in SYNTHETIC_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids)
    chat = [{"role": "user", "content": "the world"}, {"role": "assistant", "content": "12"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == theirs.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False) == "<|begin|>the world<|end|><|begin|>12<|end|>>"
    assert ours.encode_chat(chat) == theirs.apply_chat_template(chat, tokenize=True, return_dict=False)


def test_from_file_infers_bos_from_post_processor(tmp_path):
    path = write_sentencepiece_gguf(tmp_path / "spm.gguf")
    hf_tok = hf_from_gguf(path)
    hf_tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.add_bos is True and loaded.bos_id == 1 and loaded.eos_id is None
    assert loaded.chat_template is None
    for text in SYNTHETIC_TEXTS:
        assert loaded.encode(text) == hf_tok(text)["input_ids"]
    with pytest.raises(JfigError, match="no chat template"):
        loaded.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_file_reads_tokenizer_config(tmp_path):
    path = write_byte_level_gguf(tmp_path / "bpe.gguf", "llama-bpe")
    Tokenizer.from_gguf(path).backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin|>"}, "eos_token": "<|end|>", "pad_token": "<|end|>",
        "add_bos_token": True, "chat_template": "{{ messages[0]['content'] }}{{ eos_token }}",
    }))
    loaded = Tokenizer.from_file(tmp_path)
    begin, end = loaded.token_to_id("<|begin|>"), loaded.token_to_id("<|end|>")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.add_bos) == (begin, end, end, True)
    assert loaded.encode("the world") == [begin, *Tokenizer.from_gguf(path).encode("the world", add_bos=False)]
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi<|end|>"


def test_gguf_tokenizer_errors(tmp_path):
    w = _writer(tmp_path / "rwkv.gguf", "llama")
    w.add_tokenizer_model("rwkv")
    w.add_token_list(["a", "b"])
    _finish(w)
    with pytest.raises(FormatError, match=r"rwkv\.gguf.*'rwkv' is not supported.*tokenizer\.json"):
        Tokenizer.from_gguf(tmp_path / "rwkv.gguf")

    w = _writer(tmp_path / "notok.gguf", "llama")
    _finish(w)
    with pytest.raises(FormatError, match=r"notok\.gguf.*'tokenizer\.ggml\.model'"):
        Tokenizer.from_gguf(tmp_path / "notok.gguf")

    with pytest.raises(FormatError, match=r"missing\.json does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"bad\.json is not a valid HF tokenizer\.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_pre_tokenizer_splits_follow_hf():
    """Our `tokenizer.ggml.pre` -> split-regex table is HF's, so files using any of them agree."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    assert PRE_TOKENIZER_SPLITS == mapping.GGUF_PRE_TOKENIZER_SPLITS


def test_unsupported_pre_tokenizer_is_refused_by_name(tmp_path):
    path = write_byte_level_gguf(tmp_path / "bpe_foo.gguf", "deepseek-llm")
    with pytest.raises(FormatError, match=r"bpe_foo\.gguf: GGUF tokenizer\.ggml\.pre = 'deepseek-llm' is not "
                                          r"supported; supported: \[.*'llama-bpe'.*'smollm'.*\]"):
        Tokenizer.from_gguf(path)
    assert set(SUPPORTED_PRE_TOKENIZERS) == set(PRE_TOKENIZER_SPLITS) | set(GPT2_REGEX_PRE_TOKENIZERS)
    assert list(SUPPORTED_PRE_TOKENIZERS) == sorted(SUPPORTED_PRE_TOKENIZERS)


def test_missing_pre_tokenizer_reads_as_default(tmp_path):
    """Files written before `tokenizer.ggml.pre` existed get GPT-2's regex, as with "default"."""
    missing = Tokenizer.from_gguf(write_byte_level_gguf(tmp_path / "nopre.gguf", None))
    default = Tokenizer.from_gguf(write_byte_level_gguf(tmp_path / "default.gguf", "default"))
    assert json.loads(missing.backend.to_str())["pre_tokenizer"] == json.loads(default.backend.to_str())["pre_tokenizer"]
    for text in SYNTHETIC_TEXTS:
        assert missing.encode(text) == default.encode(text)


def test_chat_template_without_jinja2_names_the_extra(tmp_path, monkeypatch):
    backend = Tokenizer.from_gguf(write_byte_level_gguf(tmp_path / "chat.gguf", "llama-bpe")).backend
    tok = Tokenizer(backend, chat_template="{{ messages[0]['content'] }} (rendered without jinja2)")
    monkeypatch.setattr(tokenizer_module, "jinja2", None)
    with pytest.raises(JfigError, match=r"needs jinja2.*pip install 'jfig\[chat\]'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
