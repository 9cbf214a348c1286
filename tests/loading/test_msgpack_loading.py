"""Transformers v4 Flax checkpoints (flax_model.msgpack, sharded index) written here from PyTorch
weights with v4's parameter names load to the same logits as the PyTorch model."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, torch_logits, torch_model

import jint8
from jint8.errors import CheckpointFileError


EMBEDDINGS = ("embed_tokens", "wte", "wpe", "embed_positions")


def v4_flax_params(model) -> dict[str, np.ndarray]:
    """{v4 Flax key: array} with transformers v4's Flax names: layers/<i> (GPT-2: h/<i>), nn.Embed
    'embedding', RMSNorm 'weight', LayerNorm 'scale'; nn.Dense kernels [in, out] and FlaxConv1D
    kernels [out, in] (both the transpose of the PyTorch tensor: Conv1D stores [in, out])."""
    params = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        parts = name.split(".")
        leaf = parts[-1]
        if any(e in name for e in EMBEDDINGS):
            leaf = "embedding"
        elif array.ndim == 2:
            leaf, array = "kernel", array.T
        elif leaf == "weight" and ("ln_" in name or "layer_norm" in name):
            leaf = "scale"
        params["/".join(parts[:-1] + [leaf])] = np.ascontiguousarray(array)
    return params


def write_v4_msgpack(model, directory, shards: int = 1) -> None:
    from flax.serialization import msgpack_serialize
    from flax.traverse_util import unflatten_dict

    model.config.save_pretrained(directory)
    params = v4_flax_params(model)
    if shards == 1:
        (directory / "flax_model.msgpack").write_bytes(msgpack_serialize(unflatten_dict(params, sep="/")))
        return
    keys = sorted(params)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(keys, dtype=object), shards)):
        file = f"flax_model-{i + 1:05d}-of-{shards:05d}.msgpack"
        shard = {k: params[k] for k in chunk}
        (directory / file).write_bytes(msgpack_serialize(unflatten_dict(shard, sep="/")))
        weight_map.update({k: file for k in chunk})
    (directory / "flax_model.msgpack.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def tiny_llama():
    require_module("torch")
    return torch_model("llama")


@pytest.mark.parametrize("family, shards", [("llama", 1), ("llama", 3), ("gpt2", 2), ("opt", 1)])
def test_v4_flax_msgpack_logits_equal_transformers(family, shards, tmp_path):
    require_module("torch")
    tiny_model = torch_model(family)
    write_v4_msgpack(tiny_model, tmp_path, shards)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    ids = random_ids(2, 7)
    logits, _ = model.apply({"params": params}, jnp.asarray(ids))
    expected = torch_logits(tiny_model, ids)
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_truncated_msgpack_names_the_file(tiny_llama, tmp_path):
    write_v4_msgpack(tiny_llama, tmp_path)
    data = (tmp_path / "flax_model.msgpack").read_bytes()
    (tmp_path / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=r"flax_model\.msgpack"):
        jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)


def test_msgpack_tensors_are_views_of_the_mapped_file_and_chunked_arrays_load(tiny_llama, tmp_path, monkeypatch):
    """The file's structure is scanned, not decoded: each tensor is a read-only view of the map,
    its dtype and size known before the read; flax's chunks of a large array are joined."""
    import flax.serialization

    from jint8.loading.msgpack_file import msgpack_records

    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 4096)  # flax chunks the arrays above it
    write_v4_msgpack(tiny_llama, tmp_path)
    records = msgpack_records(tmp_path)
    assert all(r.dtype == np.float32 and r.nbytes == 4 * int(np.prod(r.shape)) for r in records)
    chunked = [r for r in records if r.release is None]
    assert chunked and len(chunked) < len(records)
    views = [r.read() for r in records if r.release is not None]
    assert all(not v.flags.writeable and not v.flags.owndata for v in views)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    ids = random_ids(2, 7)
    logits, _ = model.apply({"params": params}, jnp.asarray(ids))
    expected = torch_logits(tiny_llama, ids)
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_index_naming_a_tensor_its_shard_lacks_names_both(tiny_llama, tmp_path):
    write_v4_msgpack(tiny_llama, tmp_path, shards=2)
    index = json.loads((tmp_path / "flax_model.msgpack.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model/ghost/kernel"] = shard
    (tmp_path / "flax_model.msgpack.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=rf"{shard}.*model/ghost/kernel.*not in the shard"):
        jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
