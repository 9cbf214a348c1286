"""export_bitsandbytes writes a checkpoint that transformers loads with bitsandbytes."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, save_checkpoint, torch_logits

import jint8
from jint8.export import export_bitsandbytes


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000])
def test_exported_checkpoint_loads_in_transformers_bitsandbytes(tmp_path, family, max_shard_bytes):
    require_module("torch")
    require_module("bitsandbytes")
    transformers = require_module("transformers")
    save_checkpoint(family, tmp_path / "float")
    config = jint8.Int8Config.from_bitsandbytes({"load_in_8bit": True, "llm_int8_threshold": 5.0})
    model, params = jint8.from_pretrained(tmp_path / "float", dtype=jnp.float32, quantization=config, progress=False)
    out = export_bitsandbytes(model, params, tmp_path / "bnb", max_shard_bytes=max_shard_bytes)
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 1e6)
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta["quant_method"] == "bitsandbytes" and meta["llm_int8_threshold"] == 5.0

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    q_proj = theirs.model.layers[0].self_attn.q_proj
    assert q_proj.state.threshold == 5.0
    ours = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q_proj.weight.data.numpy(), np.asarray(ours.qvalue))  # int8 as written
    ids = random_ids(2, 9)
    expected = torch_logits(theirs, ids)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
    float_logits = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float").eval(), ids)
    scale = np.max(np.abs(float_logits))
    # Same int8 weights, same threshold; the activation paths differ in float16 casting (bnb) and
    # summation order, which flips int8 roundings at ties; on these random tiny models such
    # flips propagate to about the size of the int8 error itself (measured: llama 0.17 %, qwen2
    # 0.9 % of the logit scale, with each int8 model 0.25 % / 1.0 % from float). Bound: 2 %, and
    # the exported model must be as accurate as jint8's own (within 1.5x of its error to float).
    assert np.max(np.abs(logits - expected)) <= 2e-2 * scale
    ours_error = np.max(np.abs(logits - float_logits))
    assert np.max(np.abs(expected - float_logits)) <= 1.5 * ours_error + 1e-3 * scale

    # And it loads back into jint8 as the same int8 tree.
    _, again = jint8.from_pretrained(out, dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(np.asarray(again["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].qvalue), np.asarray(ours.qvalue))


def test_export_refuses_float_params_and_existing_dirs(tmp_path):
    require_module("torch")
    save_checkpoint("llama", tmp_path / "float")
    model, params = jint8.from_pretrained(tmp_path / "float", dtype=jnp.float32, progress=False)
    with pytest.raises(jint8.errors.InvalidConfigError, match="no Int8Weight"):
        export_bitsandbytes(model, params, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    q = jint8.quantize_params(params, jint8.Int8Config(min_size=0))
    with pytest.raises(FileExistsError, match="busy"):
        export_bitsandbytes(model, q, tmp_path / "busy")


def test_falcon_export_is_refused_where_transformers_cannot_load_it_back(tmp_path):
    """transformers' bitsandbytes integration converts torch.nn.Linear itself, not Falcon's
    FalconLinear subclass: its 8-bit Falcon keeps every projection float, and an exported int8
    Falcon would be read into float layers. Where a transformers version converts them, the export
    must load back instead."""
    require_module("torch")
    bnb = require_module("bitsandbytes")
    transformers = require_module("transformers")
    save_checkpoint("falcon_new", tmp_path / "float")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    converts = any(isinstance(module, bnb.nn.Linear8bitLt) for module in theirs.modules())
    model, params = jint8.from_pretrained(tmp_path / "float", dtype=jnp.float32, quantization=jint8.Int8Config(),
                                          progress=False)
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "float")
    if converts:
        out = export_bitsandbytes(model, params, tmp_path / "bnb", hf_config=hf_config)
        transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        return
    with pytest.raises(jint8.errors.InvalidConfigError, match=r"model_type='falcon'.*FalconLinear.*save_quantized"):
        export_bitsandbytes(model, params, tmp_path / "bnb", hf_config=hf_config)
    assert not (tmp_path / "bnb").exists()
