"""safetensors checkpoints: model.safetensors or a sharded model.safetensors.index.json.

Tensors are read as read-only numpy views of one memory map per file: nothing is copied on the
host, the page cache is the only buffer and the device transfer reads straight from it.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jint8.errors import CheckpointFileError
from jint8.loading.records import MappedFile, TensorRecord, check_readable, on_host, read_weight_map

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype -> numpy (bfloat16 / float8 from ml_dtypes); any other dtype is read through
# safetensors' flax backend onto the host CPU, as before
_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's files in index order (one file, or the shards named by the index)."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_weight_map(index, "safetensors")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointFileError(f"{index}: names shard files that do not exist: {missing}")
        return [directory / f for f in files]
    return [directory / SINGLE_FILE]


def _header(file: Path) -> tuple[int, dict]:
    """(byte offset of the data section, {name: header entry}); safe_open has validated the file."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def _reader(mapped: MappedFile, name: str, entry: dict, data_start: int):
    file, stored_dtype, shape = mapped.file, entry["dtype"], tuple(int(d) for d in entry["shape"])

    def read() -> np.ndarray:
        try:
            if stored_dtype in _NUMPY_DTYPES:
                return mapped.view(_NUMPY_DTYPES[stored_dtype], shape, data_start + int(entry["data_offsets"][0]))
            with on_host(), safe_open(file, framework="flax") as handle:
                return np.asarray(handle.get_tensor(name))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointFileError(f"{file}: cannot read tensor {name!r}: {e}") from None

    return read


def safetensors_records(directory: Path) -> list[TensorRecord]:
    """Records of every tensor of every file, in each file's data order (sequential reads);
    headers are parsed (and validated) here, data later."""
    records = []
    for file in safetensors_files(directory):
        check_readable(file)
        try:
            with safe_open(file, framework="np") as handle:
                names = set(handle.keys())
            data_start, header = _header(file)
        except (SafetensorError, OSError, ValueError, struct.error) as e:
            raise CheckpointFileError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
        mapped = MappedFile(file)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if name not in names:
                continue
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            dtype = _NUMPY_DTYPES.get(entry["dtype"])
            records.append(TensorRecord(name, os.fspath(file), name, shape, False,
                                        _reader(mapped, name, entry, data_start),
                                        np.dtype(dtype) if dtype is not None else None, end - begin,
                                        functools.partial(mapped.release, data_start + begin, end - begin)))
    return records
