"""safetensors checkpoints: model.safetensors or a sharded model.safetensors.index.json."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jint8.errors import CheckpointFileError
from jint8.loading.records import TensorRecord, read_weight_map, on_host

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# numpy has no bfloat16 / float8: those are read through the flax backend onto the host CPU
_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


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


def _reader(file: Path, name: str, stored_dtype: str):
    def read() -> np.ndarray:
        try:
            if stored_dtype in _NUMPY_DTYPES:
                with safe_open(file, framework="np") as handle:
                    return handle.get_tensor(name)
            with on_host(), safe_open(file, framework="flax") as handle:
                return np.asarray(handle.get_tensor(name))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointFileError(f"{file}: cannot read tensor {name!r}: {e}") from None

    return read


def safetensors_records(directory: Path) -> list[TensorRecord]:
    """Records of every tensor of every file; headers are parsed (and validated) here, data later."""
    records = []
    for file in safetensors_files(directory):
        try:
            with safe_open(file, framework="np") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    shape, dtype = tuple(int(d) for d in view.get_shape()), view.get_dtype()
                    records.append(TensorRecord(name, os.fspath(file), name, shape, False, _reader(file, name, dtype)))
        except (SafetensorError, OSError) as e:
            raise CheckpointFileError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return records
