"""Read a GGUF file: metadata as Python values, tensors dequantised to float32 on demand.

The file is memory-mapped, so opening it reads only the header, the metadata and the tensor
table; `tensor(name)` reads and dequantises one tensor when asked.

Orientation: GGUF lists shapes in GGML order (ne0, the contiguous input dimension, first).
Tensors come out in numpy row-major order, the reversed GGML shape, so a GGML `[ne0=in, ne1=out]`
matrix is returned as `(out, in)`, the orientation of HF `nn.Linear.weight`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import gguf
import gguf.quants
import numpy as np

from jfig.errors import FormatError

__all__ = ["GGUFContents", "TensorInfo", "read_gguf", "supported_tensor_types"]

_MAGICS = (b"GGUF", b"FUGG")  # little-endian file, big-endian file
_PLAIN_TYPES = ("F32", "F16", "F64", "I8", "I16", "I32", "I64")  # converted with astype


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What the tensor table says about one tensor, before reading its data."""

    name: str
    type_name: str  # GGMLQuantizationType name: "F32", "Q4_1", ...
    ggml_shape: tuple[int, ...]  # GGML order, ne0 (contiguous) first
    n_bytes: int
    data_offset: int  # absolute offset in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of `GGUFContents.tensor(name)`: the reversed GGML shape."""
        return tuple(reversed(self.ggml_shape))


@functools.lru_cache(maxsize=None)
def supported_tensor_types() -> tuple[str, ...]:
    """Names of the GGML tensor types `GGUFContents.tensor` can turn into float32."""
    names = list(_PLAIN_TYPES)
    for qtype in gguf.GGMLQuantizationType:
        if qtype.name in names or qtype not in gguf.GGML_QUANT_SIZES:
            continue
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:  # probe with one all-zero block: the public way to ask gguf-py what it decodes
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        except Exception:  # noqa: BLE001 -- a decoder that fails on zeros still exists
            pass
        names.append(qtype.name)
    return tuple(names)


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFContents:
    """An opened GGUF file. Metadata is decoded eagerly; tensor data stays on disk until asked.

    Attributes:
        path: the file.
        metadata: every key-value field, decoded to Python (int, float, bool, str, or a list
            of those). The reader's own `GGUF.*` pseudo-fields are left out.
        tensor_names: names in file order.
    """

    path: pathlib.Path
    metadata: dict[str, Any]
    tensor_names: tuple[str, ...]
    _infos: dict[str, TensorInfo] = dataclasses.field(repr=False)
    _raw: dict[str, Any] = dataclasses.field(repr=False)  # name -> gguf ReaderTensor (memmap)

    def require(self, key: str) -> Any:
        """The metadata value under `key`; FormatError naming the key and the file if absent."""
        if key not in self.metadata:
            raise FormatError(
                f"GGUF file {self.path} lacks the required metadata key {key!r}; "
                f"it has {len(self.metadata)} keys, e.g. {_preview(self.metadata)}"
            )
        return self.metadata[key]

    def tensor_info(self, name: str) -> TensorInfo:
        """Type, GGML shape, size and offset of tensor `name`."""
        self._check_name(name)
        return self._infos[name]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, shape `tensor_info(name).shape` (reversed GGML shape).

        A 2-D weight stored as GGML `[in, out]` comes back `(out, in)`. Always a fresh array,
        not a view of the file.
        """
        info = self.tensor_info(name)
        raw = self._raw[name]
        qtype = raw.tensor_type
        if info.type_name not in supported_tensor_types():
            raise FormatError(
                f"GGUF file {self.path}: tensor {name!r} has type {info.type_name}, which cannot be "
                f"dequantised; supported types: {', '.join(supported_tensor_types())}"
            )
        try:
            if info.type_name in _PLAIN_TYPES:
                out = np.array(raw.data, dtype=np.float32)
            else:
                out = np.asarray(gguf.quants.dequantize(raw.data, qtype), dtype=np.float32)
        except NotImplementedError as err:  # a decoder gguf-py lists but does not have
            raise FormatError(
                f"GGUF file {self.path}: tensor {name!r} of type {info.type_name} cannot be "
                f"dequantised by gguf {getattr(gguf, '__version__', '')}: {err}"
            ) from err
        if out.shape != info.shape:
            if out.size != int(np.prod(info.shape)):
                raise FormatError(
                    f"GGUF file {self.path}: tensor {name!r} decoded to {out.size} values, "
                    f"expected {int(np.prod(info.shape))} for GGML shape {list(info.ggml_shape)}"
                )
            out = out.reshape(info.shape)
        return out

    def _check_name(self, name: str) -> None:
        if name not in self._infos:
            raise FormatError(
                f"GGUF file {self.path} has no tensor {name!r}; it has {len(self.tensor_names)} "
                f"tensors, e.g. {', '.join(self.tensor_names[:6])}"
            )


def _preview(metadata: dict[str, Any], n: int = 6) -> str:
    keys = list(metadata)[:n]
    return ", ".join(keys) + (", ..." if len(metadata) > n else "")


def _decode_field(field: Any) -> Any:
    """One ReaderField as a Python value."""
    try:
        return field.contents()
    except UnicodeDecodeError:
        pass
    # Strings that are not valid UTF-8: decode with replacement rather than fail the whole file.
    def text(part: np.ndarray) -> str:
        return bytes(part).decode("utf-8", errors="replace")

    if field.types[0] == gguf.GGUFValueType.STRING:
        return text(field.parts[-1])
    return [text(field.parts[i]) for i in field.data]


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Open the GGUF file at `path` (memory-mapped), decode its metadata and tensor table.

    Raises FormatError naming the file when it is missing, is not a GGUF, or is truncated.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FormatError(f"GGUF file {path} does not exist (expected a .gguf model file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in _MAGICS:
        raise FormatError(
            f"{path} is not a GGUF file: it starts with {magic!r}, expected the magic b'GGUF'"
        )
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # noqa: BLE001 -- gguf-py raises many types on a short or bad file
        raise FormatError(
            f"GGUF file {path} ({size} bytes) is truncated or corrupt ({type(err).__name__}: "
            f"{err}); expected a complete GGUF v2/v3 file: header, metadata, tensor table and "
            f"all tensor data"
        ) from err

    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = _decode_field(field)
        except Exception as err:  # noqa: BLE001
            raise FormatError(
                f"GGUF file {path}: metadata field {key!r} could not be decoded "
                f"({type(err).__name__}: {err})"
            ) from err

    infos: dict[str, TensorInfo] = {}
    raw: dict[str, Any] = {}
    for t in reader.tensors:
        info = TensorInfo(
            name=t.name,
            type_name=t.tensor_type.name,
            ggml_shape=tuple(int(d) for d in t.shape),
            n_bytes=int(t.n_bytes),
            data_offset=int(t.data_offset),
        )
        end = info.data_offset + info.n_bytes
        if end > size:
            raise FormatError(
                f"GGUF file {path} is truncated: tensor {t.name!r} ({info.type_name}, GGML shape "
                f"{list(info.ggml_shape)}) needs bytes up to {end}, but the file has {size}"
            )
        if t.name in infos:
            raise FormatError(f"GGUF file {path} is corrupt: tensor {t.name!r} appears twice")
        infos[t.name] = info
        raw[t.name] = t
    return GGUFContents(
        path=path, metadata=metadata, tensor_names=tuple(infos), _infos=infos, _raw=raw
    )
