"""Nothing silently wrong, nothing left behind: damaged checkpoints, racing and failing writes,
bad token ids and tensors, and the clear errors a hostile user should get (issue 31)."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from reference import require_module

import jint8
from jint8.checkpoint import load_quantized, restore, save_quantized
from jint8.errors import (
    CheckpointError,
    CheckpointFileError,
    CheckpointFormatError,
    CheckpointIntegrityError,
    EmptyPromptError,
    InvalidConfigError,
    QuantizationError,
    WeightsMismatchError,
)

CONFIG = jint8.Int8Config(min_size=16)


def small_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": rng.standard_normal((64, 64)).astype(np.float32)},
              "norm": {"scale": rng.standard_normal(64).astype(np.float32)}}
    return jint8.quantize_params(params, CONFIG)


def array_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The arrays item's data files (OCDBT), largest first."""
    files = [f for f in (directory / "arrays").rglob("*") if f.is_file() and f.parent.name == "d"]
    return sorted(files, key=lambda f: -f.stat().st_size)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny transformers Llama (safetensors) and its jint8 checkpoint."""
    require_module("torch")
    from models.tiny_checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("reliability")
    save_checkpoint("llama", root / "src")
    jint8.checkpoint.quantize_checkpoint(root / "src", root / "int8", quant_config=CONFIG, progress=False)
    return root


# ----------------------------------------------------------------------------- jint8 checkpoints


def test_flipped_bytes_are_refused_by_checksum_unless_verification_is_off(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), quant_config=CONFIG)
    data = array_files(tmp_path / "ckpt")[0]
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointIntegrityError, match=r"dense/kernel/qvalue") as info:
        load_quantized(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt") in str(info.value)
    # the trusted fast path reads the damaged bytes as they are
    loaded, _ = load_quantized(tmp_path / "ckpt", verify_checksums=False)
    assert not np.array_equal(np.asarray(loaded["dense"]["kernel"].qvalue),
                              np.asarray(small_params()["dense"]["kernel"].qvalue))


DAMAGE = {
    "array file deleted": lambda d: array_files(d)[0].unlink(),
    "array file truncated": lambda d: array_files(d)[0].write_bytes(array_files(d)[0].read_bytes()[:100]),
    "manifest.ocdbt deleted": lambda d: (d / "arrays" / "manifest.ocdbt").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_arrays_item_gives_one_short_error_naming_the_checkpoint(tmp_path, damage):
    save_quantized(tmp_path / "ckpt", small_params(), quant_config=CONFIG)
    DAMAGE[damage](tmp_path / "ckpt")
    with pytest.raises(CheckpointFormatError) as info:
        load_quantized(tmp_path / "ckpt")
    message = str(info.value)
    assert str(tmp_path / "ckpt") in message and len(message) < 1000 and "\n" not in message


def test_dropped_leaf_record_and_unreadable_metadata_are_reported_as_such(tmp_path):
    directory = tmp_path / "ckpt"
    save_quantized(directory, small_params(), quant_config=CONFIG)
    metadata = directory / "metadata" / "metadata"
    raw = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**raw, "leaves": [r for r in raw["leaves"] if r["path"][0] != "norm"]}))
    with pytest.raises(CheckpointFormatError, match=r"stored arrays have no leaf record \['norm/scale'\]"):
        load_quantized(directory)
    metadata.write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="metadata item is not valid JSON"):
        jint8.from_pretrained(directory)  # not "no model.safetensors ... file"


def test_a_load_racing_an_overwrite_reads_the_new_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    save_quantized(directory, small_params(0), quant_config=CONFIG)
    real_load, calls = restore._load, []

    def load_while_overwritten(*args):
        calls.append(args)
        if len(calls) == 1:  # another process swaps in a new checkpoint mid-read
            save_quantized(directory, small_params(1), quant_config=CONFIG, overwrite=True)
            raise CheckpointFormatError(f"{directory}: the arrays item is damaged or incomplete")
        return real_load(*args)

    monkeypatch.setattr(restore, "_load", load_while_overwritten)
    loaded, _ = load_quantized(directory)
    assert len(calls) == 2
    np.testing.assert_array_equal(np.asarray(loaded["norm"]["scale"]), np.asarray(small_params(1)["norm"]["scale"]))


def test_failed_write_is_one_error_and_leaves_no_staging(tmp_path, monkeypatch):
    def disk_full(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(directory))

    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", disk_full)
    with pytest.raises(CheckpointError, match=r"writing .*ckpt failed: \[ENOSPC\]"):
        save_quantized(tmp_path / "ckpt", small_params(), quant_config=CONFIG)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a target whose parent cannot be created is refused before any work
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write to"):
        save_quantized(tmp_path / "file" / "ckpt", small_params(), quant_config=CONFIG)
    calls = []
    monkeypatch.setattr(jint8, "from_pretrained", lambda *a, **k: calls.append(a))
    with pytest.raises(CheckpointError, match="cannot write to"):
        jint8.checkpoint.quantize_checkpoint("src", tmp_path / "file" / "ckpt")
    assert calls == []  # refused before the (long) load


def test_stored_config_is_checked_against_the_arrays(tiny_llama, tmp_path):
    directory = tmp_path / "int8"
    shutil.copytree(tiny_llama / "int8", directory)
    metadata = directory / "metadata" / "metadata"
    raw = json.loads(metadata.read_text())
    raw["model_config"]["num_layers"] = 1
    metadata.write_text(json.dumps(raw))
    with pytest.raises(WeightsMismatchError, match=r"does not match the stored arrays.*layers_1") as info:
        jint8.from_pretrained(directory)
    assert str(directory) in str(info.value)
    raw["model_config"]["num_layers"], raw["model_config"]["intermediate_size"] = 2, 96
    metadata.write_text(json.dumps(raw))
    with pytest.raises(WeightsMismatchError, match="shapes differ"):
        jint8.from_pretrained(directory)


# ----------------------------------------------------------------------------- bitsandbytes export


def test_export_overwrite_publishes_atomically_without_stale_shards(tiny_llama, tmp_path):
    require_module("torch")
    from jint8.export import export_bitsandbytes

    model, params = jint8.from_pretrained(tiny_llama / "src", dtype=jnp.float32, progress=False,
                                          quantization=jint8.Int8Config(min_size=0))
    out = tmp_path / "bnb"
    export_bitsandbytes(model, params, out, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists()
    (out / "tokenizer.json").write_text("{}")  # a user's file beside the export
    changed = jax.tree.map(lambda x: x, params)
    changed["model"]["norm"]["scale"] = params["model"]["norm"]["scale"] + 1.0
    export_bitsandbytes(model, changed, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bnb"]  # no staging left
    _, loaded = jint8.from_pretrained(out, dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(np.asarray(loaded["model"]["norm"]["scale"]),
                                  np.asarray(changed["model"]["norm"]["scale"]))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(jint8.errors.CheckpointExistsError, match="not an exported checkpoint"):
        export_bitsandbytes(model, params, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


# ----------------------------------------------------------------------------- loading


def test_nonfinite_float_tensors_are_refused_on_unquantized_loads(tiny_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny_llama / "src", tmp_path / "src")
    file = tmp_path / "src" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"][3] = np.nan
    tensors["model.embed_tokens.weight"][5, 1] = np.inf
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=r"NaN/Inf.*(model.norm.weight|model.embed_tokens.weight)"):
        jint8.from_pretrained(tmp_path / "src", dtype=jnp.float32, progress=False)


def test_truncated_gguf_is_named_as_truncated(tmp_path):
    require_module("torch")
    from loading.tiny_gguf import write_llama_gguf
    from models.tiny_checkpoints import torch_model

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(torch_model("smollm2"), path, quant="F32")
    whole = path.read_bytes()
    for cut in (600, len(whole) - 5000):  # inside the header, inside the tensor data
        path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointFileError, match="is truncated") as info:
            jint8.from_pretrained(path, progress=False)
        assert str(path) in str(info.value)


def test_unreadable_file_is_reported_as_permission_denied(tmp_path, monkeypatch):
    require_module("torch")
    from loading.tiny_gguf import write_llama_gguf
    from models.tiny_checkpoints import torch_model

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(torch_model("smollm2"), path, quant="F32")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: act as the user the mode bits would stop
        real_open = builtins.open

        def open_as_user(file, *args, **kwargs):
            if os.fspath(file) == os.fspath(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_as_user)
    with pytest.raises(CheckpointFileError, match="permission denied") as info:
        jint8.from_pretrained(path, progress=False)
    assert str(path) in str(info.value) and "truncated" not in str(info.value)


# ----------------------------------------------------------------------------- token ids


def test_int64_token_ids_are_checked_before_the_int32_cast(tiny_llama):
    model, params = jint8.from_pretrained(tiny_llama / "int8")
    for bad in (2**40, 2**32 + 5):
        ids = np.array([[1, 2, bad]], np.int64)
        with pytest.raises(EmptyPromptError, match="outside"):
            jint8.generate(model, params, ids, config=jint8.GenerationConfig(max_new_tokens=1))
        with pytest.raises(InvalidConfigError, match="outside"):
            jint8.evaluation.perplexity(model, params, ids[0], max_length=3, stride=3)
    context = model.config.max_position_embeddings
    with pytest.raises(InvalidConfigError, match="exceeds the model's context"):
        jint8.evaluation.perplexity(model, params, np.arange(8), max_length=context + 1, stride=4)


# ----------------------------------------------------------------------------- Int8Config


@pytest.mark.parametrize("fields", [
    dict(threshold=True), dict(min_size=1.5), dict(min_size=True), dict(kernel_names=()),
    dict(capacity_overrides={"q_proj": -1}), dict(capacity_overrides={"q_proj": 2.5}),
    dict(threshold_overrides={"q_proj": True}), dict(in_ndim_overrides={"attn": 0}),
    dict(outlier_capacity=True),
])
def test_int8_config_refuses_bad_fields_naming_them(fields):
    (name,) = fields
    with pytest.raises(InvalidConfigError, match=f"Int8Config.{name}"):
        jint8.Int8Config(**fields)


def test_patterns_matching_nothing_are_reported_when_applied(caplog):
    params = {"model": {"q_proj": {"kernel": np.ones((32, 32), np.float32)}}}
    config = jint8.Int8Config(min_size=0, skip_modules=("lm_haed", "q_proj"), capacity_overrides={"re:k_prj": 2})
    with caplog.at_level(logging.WARNING, logger="jint8"):
        jint8.quantize_params(params, config)
    assert "skip_modules: 'lm_haed'" in caplog.text and "capacity_overrides: 're:k_prj'" in caplog.text
    assert "'q_proj'" not in caplog.text


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_config_check_shapes_extended_from_few_traced_layers_equal_the_whole_init(family):
    require_module("transformers")
    from models.tiny_checkpoints import hf_config

    from jint8.loading import config_check
    from jint8.models import spec_for

    hf = hf_config(family)
    setattr(hf, "n_layer" if family == "gpt2" else "num_hidden_layers", 4)
    if family == "gemma2":
        hf.layer_types = ["sliding_attention", "full_attention"] * 2
    spec = spec_for(hf.model_type)
    model = spec.model_class(spec.config_from_hf(hf, jnp.float32))
    assert model.config.num_layers == 4
    whole, fast = config_check._init_shapes(model), config_check.abstract_params(model)
    assert {p: (s.shape, s.dtype) for p, s in fast.items()} == {p: (s.shape, s.dtype) for p, s in whole.items()}
