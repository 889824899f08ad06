"""A GGUF file's metadata and tensor table, read without decoding what nobody asks for.

`gguf.GGUFReader` builds a numpy view for every element of every metadata array as it opens a
file, one per vocabulary entry and merge: seconds for a 49k-token vocabulary, more for Gemma's
262k. Loading a model needs a dozen scalars and the tensor table; the vocabulary is read by the
tokenizer (once, then cached). So this reader walks the header with `struct`, keeps where each
value lies, and decodes a value only when `get` asks for it. Tensor data are views of one
read-only memory map, shaped as `gguf.ReaderTensor.data` is, so `gguf.quants` takes them.

The layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version,
tensor and key/value counts, the key/value pairs, the tensor infos (name, dimensions fastest
first, type, offset), then the tensor data from the next multiple of `general.alignment`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# Value types of the format, by code: struct format of the scalar, numpy dtype of an array.
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "<u2"), 3: ("h", "<i2"), 4: ("I", "<u4"),
    5: ("i", "<i4"), 6: ("f", "<f4"), 7: ("?", "?"), 10: ("Q", "<u8"), 11: ("q", "<i8"),
    12: ("d", "<f8"),
}
_BOOL = 7
_FLOAT_TENSORS = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}
"""Types whose data are a plain numpy array; the rest (BF16 and the block formats) are bytes."""


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (bad magic, truncated, garbage)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    """Dimensions fastest first, as GGUF (and `gguf.ReaderTensor`) list them."""
    tensor_type: GGMLQuantizationType
    data: np.ndarray
    """A read-only view of the file: `shape` reversed for the plain types, else uint8 with
    the last dimension in bytes (one row of blocks)."""
    offset: int
    """Where the data start in the file."""


@dataclass(frozen=True)
class _Value:
    type: int
    offset: int  # of the value itself (for an array: of its element type)


class GGUFFile:
    """One open GGUF file: `get(key)` for metadata, `tensors` for the tensor table."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 24:
                raise GGUFFormatError(f"{size} bytes is shorter than a GGUF header")
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._buffer = memoryview(self._map)
        self._size = size
        if self._buffer[:4] != _MAGIC:
            raise GGUFFormatError(f"bad magic {bytes(self._buffer[:4])!r}")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", self._buffer, 4)
        if version not in _VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise GGUFFormatError(f"unsupported GGUF version {version}{hint}")
        # Every pair and tensor info takes more than 8 bytes: larger counts are garbage.
        if tensor_count > size // 8 or kv_count > size // 8:
            raise GGUFFormatError(f"implausible counts ({tensor_count} tensors, {kv_count} keys)")
        self.version = version
        offset = 24
        self._values: dict[str, _Value] = {}
        for _ in range(kv_count):
            key, offset = self._string(offset)
            (kind,), offset = self._unpack("<I", offset)
            self._values[key] = _Value(kind, offset)
            offset = self._skip(kind, offset)
        infos = []
        for _ in range(tensor_count):
            name, offset = self._string(offset)
            (dims,), offset = self._unpack("<I", offset)
            if dims > 8:
                raise GGUFFormatError(f"tensor {name!r} has {dims} dimensions")
            shape, offset = self._unpack(f"<{dims}Q", offset)
            (kind, data_offset), offset = self._unpack("<IQ", offset)
            infos.append((name, tuple(int(d) for d in shape), kind, data_offset))
        alignment = self.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GGUFFormatError(f"bad general.alignment {alignment!r}")
        start = -(-offset // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def keys(self) -> list[str]:
        return list(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        """The value as a plain Python object (int, float, bool, str, or a list of them)."""
        value = self._values.get(key)
        return default if value is None else self._decode(value.type, value.offset)[0]

    def _tensor(self, start: int, name: str, shape: tuple[int, ...], kind: int,
                data_offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {kind}") from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if not shape or shape[0] % block:
            raise GGUFFormatError(f"tensor {name!r} of shape {shape} does not fill {qtype.name} "
                                  f"blocks of {block}")
        row_bytes = shape[0] // block * block_bytes
        rows = int(np.prod(shape[1:], dtype=np.int64))
        begin = start + data_offset
        end = begin + rows * row_bytes
        if end > self._size:
            raise GGUFFormatError(f"tensor {name!r} runs past the end of the file")
        data = np.frombuffer(self._buffer, np.uint8, rows * row_bytes, begin)
        plain = _FLOAT_TENSORS.get(qtype)
        if plain is not None:
            data = data.view(plain).reshape(tuple(reversed(shape)))
        else:
            data = data.reshape(*reversed(shape[1:]), row_bytes)
        return GGUFTensor(name, shape, qtype, data, begin)

    def _unpack(self, fmt: str, offset: int) -> tuple[tuple[Any, ...], int]:
        try:
            values = struct.unpack_from(fmt, self._buffer, offset)
        except struct.error:
            raise GGUFFormatError(f"truncated at byte {offset}") from None
        return values, offset + struct.calcsize(fmt)

    def _string(self, offset: int) -> tuple[str, int]:
        (length,), offset = self._unpack("<Q", offset)
        if offset + length > self._size:
            raise GGUFFormatError(f"a string at byte {offset} runs past the end of the file")
        text = bytes(self._buffer[offset:offset + length]).decode("utf-8", errors="replace")
        return text, offset + length

    def _skip(self, kind: int, offset: int) -> int:
        """The offset just past a value of type `kind` at `offset`, decoding nothing."""
        if kind in _SCALARS:
            return offset + struct.calcsize(_SCALARS[kind][0])
        if kind == _STRING:
            (length,), offset = self._unpack("<Q", offset)
            return self._bounded(offset + length)
        if kind != _ARRAY:
            raise GGUFFormatError(f"unknown value type {kind} at byte {offset}")
        (element, count), offset = self._unpack("<IQ", offset)
        if element in _SCALARS:
            return self._bounded(offset + count * struct.calcsize(_SCALARS[element][0]))
        if count > self._size:
            raise GGUFFormatError(f"implausible array length {count} at byte {offset}")
        if element == _STRING:  # the vocabulary: walk the lengths, read none of the text
            buffer, unpack = self._buffer, struct.Struct("<Q").unpack_from
            try:
                for _ in range(count):
                    offset += 8 + unpack(buffer, offset)[0]
            except struct.error:
                raise GGUFFormatError(f"truncated at byte {offset}") from None
            return self._bounded(offset)
        for _ in range(count):
            offset = self._skip(element, offset)
        return offset

    def _bounded(self, offset: int) -> int:
        if offset > self._size:
            raise GGUFFormatError("a metadata value runs past the end of the file")
        return offset

    def _decode(self, kind: int, offset: int) -> tuple[Any, int]:
        if kind in _SCALARS:
            (value,), end = self._unpack("<" + _SCALARS[kind][0], offset)
            return value, end
        if kind == _STRING:
            return self._string(offset)
        (element, count), offset = self._unpack("<IQ", offset)
        if element in _SCALARS and element != _BOOL:
            dtype = np.dtype(_SCALARS[element][1])
            values = np.frombuffer(self._buffer, dtype, count, offset)
            return values.tolist(), offset + count * dtype.itemsize
        items = []
        for _ in range(count):
            item, offset = self._decode(element, offset)
            items.append(item)
        return items, offset
