"""Transformers v4 Flax checkpoints: flax_model.msgpack or a sharded flax_model.msgpack.index.json.

v4 Flax names: "model/layers/0/self_attn/q_proj/kernel" (kernels already [in, out]),
"model/embed_tokens/embedding", norms ".../weight" or ".../scale". They are renamed to
transformers' names here so the one name map applies; `flax_layout` skips the transpose.
Each shard is read whole (msgpack has no random access): peak host memory ~ one shard.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jint8.errors import CheckpointFileError
from jint8.loading.records import TensorRecord, check_readable, read_weight_map

SINGLE_FILE = "flax_model.msgpack"
INDEX_FILE = "flax_model.msgpack.index.json"
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}


def v4_flax_key_to_hf(key: str) -> str:
    """'model/layers/0/self_attn/q_proj/kernel' -> 'model.layers.0.self_attn.q_proj.weight'."""
    parts = key.split("/")
    return ".".join(parts[:-1] + [_LEAF_TO_HF.get(parts[-1], parts[-1])])


def _read_shard(file: Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    check_readable(file)
    try:
        tree = msgpack_restore(file.read_bytes())
        return {k: np.asarray(v) for k, v in flatten_dict(tree, sep="/").items()}
    except Exception as e:  # msgpack raises several unrelated types on truncated/corrupt bytes
        raise CheckpointFileError(f"{file}: not a readable Flax msgpack file (truncated or corrupt?): {type(e).__name__}: {e}") from None


class _ShardCache:
    """Holds the one shard being read, so peak host memory stays near one shard."""

    def __init__(self):
        self.file, self.tensors = None, {}

    def get(self, file: Path, key: str) -> np.ndarray:
        if self.file != file:
            self.file, self.tensors = None, {}
            self.tensors, self.file = _read_shard(file), file
        if key not in self.tensors:
            raise CheckpointFileError(f"{file}: tensor {key!r} named by the index is not in the shard")
        return self.tensors.pop(key)


def msgpack_records(directory: Path) -> list[TensorRecord]:
    """Records of every tensor; a single file is read once here for its names and shapes."""
    cache = _ShardCache()
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_weight_map(index, "Flax msgpack")
        entries = [(key, directory / file, None) for key, file in weight_map.items()]
        entries.sort(key=lambda e: os.fspath(e[1]))  # shard by shard
    else:
        file = directory / SINGLE_FILE
        tensors = _read_shard(file)
        entries = [(key, file, tuple(v.shape)) for key, v in tensors.items()]
        cache.file, cache.tensors = file, tensors
    return [
        TensorRecord(v4_flax_key_to_hf(key), os.fspath(file), key, shape, True,
                     (lambda file=file, key=key: cache.get(file, key)))
        for key, file, shape in entries
    ]
