"""safetensors directories: single file, sharded index, quantize-while-loading rules, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, save_checkpoint, torch_logits

import jint8
from jint8.errors import (
    CheckpointFileError,
    InsufficientMemoryError,
    UnsupportedArchitectureError,
    WeightsMismatchError,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    require_module("torch")
    directory = tmp_path_factory.mktemp("llama")
    torch_model = save_checkpoint("llama", directory)
    return directory, torch_model


@pytest.fixture
def broken_copy(llama_dir, tmp_path):
    """A writable copy of the checkpoint directory to damage."""
    for file in llama_dir[0].iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def _save_tensors(directory, tensors: dict, file="model.safetensors"):
    from safetensors.numpy import save_file

    save_file(tensors, str(directory / file))


def _load_tensors(directory, file="model.safetensors") -> dict:
    from safetensors.numpy import load_file

    return load_file(str(directory / file))


def test_sharded_index_loads_like_the_single_file(llama_dir, tmp_path):
    directory, torch_model = llama_dir
    torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    model, sharded = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    _, single = jint8.from_pretrained(directory, dtype=jnp.float32, progress=False)
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_bfloat16_checkpoint_and_compute_dtype(llama_dir, tmp_path):
    torch = require_module("torch")
    _, torch_model = llama_dir
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    torch_model.to(torch.float32)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.bfloat16, progress=False)
    assert model.config.dtype == jnp.bfloat16
    assert params["model"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    ids = random_ids(1, 6)
    logits, _ = model.apply({"params": params}, jnp.asarray(ids))
    assert logits.dtype == jnp.float32
    expected = torch_logits(torch_model, ids)
    # bf16 weights and activations: 8 mantissa bits, ~0.4 % per rounding, a few % after 2 layers
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 0.05 * np.max(np.abs(expected))


def test_skip_modules_keeps_lm_head_float_and_quantizes_the_rest(llama_dir):
    directory, _ = llama_dir
    config = jint8.Int8Config(skip_modules=("lm_head",), capacity_overrides={"down_proj": 8})
    _, params = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=config, progress=False)
    assert not isinstance(params["lm_head"]["kernel"], jint8.Int8Weight)
    down = params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(down, jint8.Int8Weight) and down.outlier_capacity == 8
    q_proj = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q_proj.outlier_capacity == 64 and q_proj.scale.shape == (64,)
    # the loader's int8 tree equals quantize_params applied to the float tree
    _, float_params = jint8.from_pretrained(directory, dtype=jnp.float32, progress=False)
    expected = jint8.quantize_params(float_params, config)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_unknown_architecture_is_named(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    config["model_type"] = "bert"
    config["architectures"] = ["BertForMaskedLM"]
    (broken_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        jint8.from_pretrained(broken_copy, progress=False)


def test_missing_weights_file_and_pickles_are_refused(broken_copy):
    (broken_copy / "model.safetensors").rename(broken_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointFileError, match="pickle"):
        jint8.from_pretrained(broken_copy, progress=False)


def test_missing_tensor_is_named(broken_copy):
    tensors = _load_tensors(broken_copy)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _save_tensors(broken_copy, tensors)
    with pytest.raises(WeightsMismatchError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        jint8.from_pretrained(broken_copy, progress=False)


def test_unknown_tensor_is_named(broken_copy):
    tensors = _load_tensors(broken_copy)
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    _save_tensors(broken_copy, tensors)
    with pytest.raises(WeightsMismatchError, match=r"extra_proj.*model\.safetensors"):
        jint8.from_pretrained(broken_copy, progress=False)


def test_shape_mismatch_names_tensor_and_shapes(broken_copy):
    tensors = _load_tensors(broken_copy)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    _save_tensors(broken_copy, tensors)
    with pytest.raises(WeightsMismatchError, match=r"k_proj\.weight.*\(48, 64\).*\(32, 64\)"):
        jint8.from_pretrained(broken_copy, progress=False)


def test_truncated_safetensors_names_the_file_and_places_nothing(broken_copy):
    data = (broken_copy / "model.safetensors").read_bytes()
    (broken_copy / "model.safetensors").write_bytes(data[:-100])
    before = len(jax.live_arrays())
    with pytest.raises(CheckpointFileError, match=r"model\.safetensors.*truncated"):
        jint8.from_pretrained(broken_copy, quantization=jint8.Int8Config(), progress=False)
    assert len(jax.live_arrays()) == before


def test_non_float_tensor_is_named_before_anything_is_placed(broken_copy):
    tensors = _load_tensors(broken_copy)
    weight = tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros(weight.shape, np.int32)
    _save_tensors(broken_copy, tensors)
    before = len(jax.live_arrays())
    with pytest.raises(CheckpointFileError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                                  r"has non-float dtype int32"):
        jint8.from_pretrained(broken_copy, quantization=jint8.Int8Config(), progress=False)
    assert len(jax.live_arrays()) == before


def test_index_naming_a_missing_shard_is_refused(llama_dir, tmp_path):
    _, torch_model = llama_dir
    torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointFileError, match=rf"index\.json: names shard files that do not exist: .*{shards[-1].name}"):
        jint8.from_pretrained(tmp_path, progress=False)


def test_nan_found_mid_load_deletes_what_was_placed(broken_copy):
    tensors = _load_tensors(broken_copy)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    _save_tensors(broken_copy, tensors)
    before = len(jax.live_arrays())
    with pytest.raises(jint8.errors.QuantizationError, match="layers_1/mlp/down_proj/kernel.*NaN"):
        jint8.from_pretrained(broken_copy, quantization=jint8.Int8Config(), progress=False)
    assert len(jax.live_arrays()) == before


def test_max_memory_too_small_says_how_much_is_needed(llama_dir):
    directory, _ = llama_dir
    with pytest.raises(InsufficientMemoryError, match=r"needs 421\.25 KiB \(431360 bytes\).*device 0: 10\.00 KiB"):
        jint8.from_pretrained(directory, dtype=jnp.float32, max_memory={0: "10KiB"}, progress=False)
    jint8.from_pretrained(directory, dtype=jnp.float32, max_memory={0: "1GiB"}, progress=False)


def test_progress_bar_counts_the_checkpoint_bytes(llama_dir, capsys):
    from tqdm import tqdm

    directory, _ = llama_dir
    stored = sum(tensor.nbytes for tensor in _load_tensors(directory).values())
    jint8.from_pretrained(directory, dtype=jnp.float32, progress=True)
    err = capsys.readouterr().err
    done = tqdm.format_sizeof(stored)
    assert f"{done}/{done}" in err and "B/s" in err, err
    jint8.from_pretrained(directory, dtype=jnp.float32, progress=False)
    assert capsys.readouterr().err == ""
    jint8.from_pretrained(directory, dtype=jnp.float32)  # default: only when stderr is a terminal
    assert capsys.readouterr().err == ""
