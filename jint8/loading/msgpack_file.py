"""Transformers v4 Flax checkpoints: flax_model.msgpack or a sharded flax_model.msgpack.index.json.

v4 Flax names: "model/layers/0/self_attn/q_proj/kernel" (kernels already [in, out]),
"model/embed_tokens/embedding", norms ".../weight" or ".../scale". They are renamed to
transformers' names here so the one name map applies; `flax_layout` skips the transpose.

flax.serialization writes a nested msgpack map whose array leaves are ext values holding
(shape, dtype name, raw bytes). msgpack has no index, but its framing says every value's length:
_Scanner walks a memory-mapped file's structure, reading the few bytes of each header and
skipping the array bytes, so each tensor becomes a read-only view of the map (as a safetensors
tensor is) with its shape and dtype known before anything is read. flax splits arrays above
2**30 bytes into "__msgpack_chunked_array__" pieces; those are joined on the host when read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jint8.errors import CheckpointFileError
from jint8.loading.records import MappedFile, TensorRecord, check_readable, read_weight_map

SINGLE_FILE = "flax_model.msgpack"
INDEX_FILE = "flax_model.msgpack.index.json"
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}
_NDARRAY, _NPSCALAR = 1, 3  # flax.serialization._MsgpackExtType
_CHUNKED = "__msgpack_chunked_array__"


def v4_flax_key_to_hf(key: str) -> str:
    """'model/layers/0/self_attn/q_proj/kernel' -> 'model.layers.0.self_attn.q_proj.weight'."""
    parts = key.split("/")
    return ".".join(parts[:-1] + [_LEAF_TO_HF.get(parts[-1], parts[-1])])


@dataclasses.dataclass(frozen=True)
class _StoredArray:
    """An array leaf of the file: its bytes start at `offset`."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class _Truncated(Exception):
    pass


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class _Scanner:
    """One msgpack value at a time from a buffer; ndarray ext values become _StoredArray."""

    # format byte -> (struct format of its length or value, kind)
    _SIZED = {0xc4: (">B", "bin"), 0xc5: (">H", "bin"), 0xc6: (">I", "bin"),
              0xc7: (">B", "ext"), 0xc8: (">H", "ext"), 0xc9: (">I", "ext"),
              0xd9: (">B", "str"), 0xda: (">H", "str"), 0xdb: (">I", "str"),
              0xdc: (">H", "array"), 0xdd: (">I", "array"), 0xde: (">H", "map"), 0xdf: (">I", "map")}
    _NUMBERS = {0xca: ">f", 0xcb: ">d", 0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q",
                0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q"}
    _FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def _skip(self, n: int) -> int:
        """Move past n bytes without reading them (a slice of an mmap would copy them); their start."""
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buffer):
            raise _Truncated(f"a value at byte {start} needs {n} bytes, the file ends at {len(self.buffer)}")
        return start

    def _take(self, n: int) -> bytes:
        start = self._skip(n)
        return self.buffer[start:self.pos]

    def _unpack(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def value(self):
        b = self._take(1)[0]
        if b <= 0x7f:
            return b
        if b >= 0xe0:
            return b - 0x100
        if 0x80 <= b <= 0x8f:
            return self._map(b & 0x0f)
        if 0x90 <= b <= 0x9f:
            return [self.value() for _ in range(b & 0x0f)]
        if 0xa0 <= b <= 0xbf:
            return self._take(b & 0x1f).decode()
        if b in (0xc0, 0xc2, 0xc3):
            return {0xc0: None, 0xc2: False, 0xc3: True}[b]
        if b in self._NUMBERS:
            return self._unpack(self._NUMBERS[b])
        if b in self._FIXEXT:
            return self._ext(self._unpack(">b"), self._FIXEXT[b])
        if b not in self._SIZED:
            raise ValueError(f"byte {self.pos - 1}: 0x{b:02x} is no msgpack format")
        fmt, kind = self._SIZED[b]
        n = self._unpack(fmt)
        if kind == "bin":
            return bytes(self._take(n))
        if kind == "str":
            return self._take(n).decode()
        if kind == "array":
            return [self.value() for _ in range(n)]
        if kind == "map":
            return self._map(n)
        return self._ext(self._unpack(">b"), n)

    def _map(self, n: int) -> dict:
        return {self.value(): self.value() for _ in range(n)}

    def _ext(self, code: int, length: int):
        end = self.pos + length
        if code not in (_NDARRAY, _NPSCALAR):
            self._skip(length)
            return None  # flax's complex scalars: no model parameter
        # the payload is msgpack of (shape, dtype name, bytes): read the first two, skip the bytes
        if self._take(1)[0] != 0x93:
            raise ValueError(f"byte {self.pos - 1}: an ndarray ext value that is not (shape, dtype, bytes)")
        shape, name = tuple(int(d) for d in self.value()), self.value()
        b = self._take(1)[0]
        if b not in (0xc4, 0xc5, 0xc6):
            raise ValueError(f"byte {self.pos - 1}: an ndarray ext value without its bytes")
        n = self._unpack(self._SIZED[b][0])
        array = _StoredArray(self._skip(n), shape, _dtype(name if isinstance(name, str) else name.decode()))
        if self.pos != end or n != array.nbytes:
            raise ValueError(f"byte {array.offset}: array of shape {shape} {name} holds {n} bytes, "
                             f"its ext value {length}")
        return array


def _leaves(tree, prefix=()):
    """(key path, _StoredArray or [chunks] with the shape) of every array leaf of a scanned tree."""
    if isinstance(tree, dict):
        if tree.get(_CHUNKED) is True:
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            yield prefix, (tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"]))), chunks)
            return
        for key, child in tree.items():
            yield from _leaves(child, prefix + (str(key),))
    elif isinstance(tree, _StoredArray):
        yield prefix, tree


def _read(mapped: MappedFile, key: str, leaf) -> np.ndarray:
    try:
        if isinstance(leaf, _StoredArray):
            return mapped.view(leaf.dtype, leaf.shape, leaf.offset)
        shape, chunks = leaf  # flax's chunks of the flattened array: one host copy joins them
        return np.concatenate([mapped.view(c.dtype, c.shape, c.offset) for c in chunks]).reshape(shape)
    except (OSError, ValueError) as e:
        raise CheckpointFileError(f"{mapped.file}: cannot read tensor {key!r}: {e}") from None


def _shard_records(file: Path) -> list[TensorRecord]:
    check_readable(file)
    mapped = MappedFile(file)
    try:
        scanner = _Scanner(mapped.buffer())
        tree = scanner.value()
        if not isinstance(tree, dict):
            raise ValueError(f"the file holds a {type(tree).__name__}, not a map of parameters")
        leaves = list(_leaves(tree))
    except _Truncated as e:
        raise CheckpointFileError(f"{file}: Flax msgpack file is truncated: {e}") from None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointFileError(f"{file}: not a readable Flax msgpack file (corrupt?): {type(e).__name__}: {e}") from None
    records = []
    for path, leaf in leaves:
        key = "/".join(path)
        if isinstance(leaf, _StoredArray):
            shape, dtype, nbytes = leaf.shape, leaf.dtype, leaf.nbytes
            release = functools.partial(mapped.release, leaf.offset, leaf.nbytes)
        else:
            shape, dtype, nbytes, release = leaf[0], leaf[1][0].dtype, sum(c.nbytes for c in leaf[1]), None
        records.append(TensorRecord(v4_flax_key_to_hf(key), os.fspath(file), key, shape, True,
                                    functools.partial(_read, mapped, key, leaf), dtype, nbytes, release))
    return records


def msgpack_records(directory: Path) -> list[TensorRecord]:
    """Records of every tensor, shard by shard in file order; structures are scanned here, data later."""
    index = directory / INDEX_FILE
    if not index.exists():
        return _shard_records(directory / SINGLE_FILE)
    weight_map = read_weight_map(index, "Flax msgpack")
    records = []
    for name in sorted(set(weight_map.values())):
        file = directory / name
        shard = _shard_records(file)
        stored = {record.stored_name for record in shard}
        absent = sorted(key for key, f in weight_map.items() if f == name and key not in stored)
        if absent:
            raise CheckpointFileError(f"{file}: tensor {absent[0]!r} named by the index is not in the shard")
        records.extend(shard)
    return records
