"""BLOOM and Falcon beyond the shared parity tests (test_model_parity.py): greedy generation equal
to transformers' generate (ALiBi and rotary through the static cache, left-padded batch), a
bitsandbytes 8-bit BLOOM checkpoint, an Orbax round trip of the quantized trees, the ALiBi slopes,
and the Falcon configurations jint8 refuses."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, torch_logits, torch_model

import jint8
from jint8 import GenerationConfig, generate
from jint8.errors import UnsupportedArchitectureError
from jint8.models import BloomForCausalLM, FalconConfig
from jint8.models.alibi import alibi_slopes

PROMPTS = [[5, 9, 13, 5, 9, 22, 7], [3, 14, 15, 92, 65], [17, 2, 71, 8, 28, 18, 28, 45, 90, 45]]


def _peaked_checkpoint(family, directory):
    """A tiny random model with its matrices scaled up, so that greedy decoding has clear argmax
    margins (float32 summation-order differences cannot flip a token), saved with safetensors."""
    torch = require_module("torch")
    model = torch_model(family)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.mul_(4.0)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _left_pad(prompts):
    width = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), width), np.int32), np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    return ids, mask


@pytest.mark.parametrize("family", ["bloom", "falcon_7b"])
def test_greedy_generation_equals_transformers_generate(family, tmp_path):
    torch = require_module("torch")
    torch_lm = _peaked_checkpoint(family, tmp_path)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    ids, mask = _left_pad(PROMPTS)
    with torch.no_grad():
        expected = torch_lm.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                     max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                                     eos_token_id=None).numpy()
    result = generate(model, params, ids, mask, GenerationConfig(max_new_tokens=16, pad_token_id=0))
    assert expected.shape[1] == ids.shape[1] + 16
    np.testing.assert_array_equal(result.sequences[:, : expected.shape[1]], expected)


@pytest.fixture(scope="module")
def bloom_float_and_bnb_dirs(tmp_path_factory):
    require_module("torch")
    require_module("bitsandbytes")
    transformers = require_module("transformers")
    float_dir, bnb_dir = tmp_path_factory.mktemp("bloom_float"), tmp_path_factory.mktemp("bloom_bnb8")
    torch_model("bloom").save_pretrained(float_dir, safe_serialization=True)
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    bnb_model.save_pretrained(bnb_dir)
    return float_dir, bnb_dir, bnb_model


def test_bnb_int8_bloom_checkpoint_loads_as_stored_and_round_trips_through_orbax(bloom_float_and_bnb_dirs, tmp_path):
    _, bnb_dir, bnb_model = bloom_float_and_bnb_dirs
    model, params = jint8.from_pretrained(bnb_dir, dtype=jnp.float32, progress=False)
    assert isinstance(model, BloomForCausalLM)
    qkv = params["transformer"]["h_0"]["self_attention"]["query_key_value"]["kernel"]
    stored = bnb_model.transformer.h[0].self_attention.query_key_value.weight
    assert isinstance(qkv, jint8.Int8Weight) and qkv.threshold == 6.0
    np.testing.assert_array_equal(qkv.qvalue, stored.CB.numpy())
    np.testing.assert_array_equal(qkv.scale, stored.SCB.numpy())
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jint8.Int8Weight))
    assert sum(isinstance(leaf, jint8.Int8Weight) for leaf in leaves) == 8  # 4 Linear per block
    ids = random_ids(2, 7)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
    # bitsandbytes' own LLM.int8() forward of the same int8 weights: both quantize activations
    # per row with threshold 6; differences are float summation order and the 1/127 rounding of
    # activations where the two paths round differently (the Llama test's bound)
    expected = torch_logits(bnb_model, ids)
    assert np.max(np.abs(logits - expected)) <= 1e-2 * np.max(np.abs(expected))
    # the int8 tree and BloomConfig survive jint8's own checkpoint bit for bit
    jint8.save_quantized(tmp_path / "ckpt", params, quant_config=jint8.Int8Config(), model_config=model.config)
    restored_model, restored = jint8.from_pretrained(tmp_path / "ckpt")
    assert restored_model.config == model.config
    again = np.asarray(restored_model.apply({"params": restored}, jnp.asarray(ids))[0])
    np.testing.assert_array_equal(again, logits)


def test_falcon_config_survives_the_checkpoint_metadata():
    """save_quantized stores the model config as JSON; from_pretrained rebuilds it (RopeConfig
    included) from that JSON alone."""
    from jint8.checkpoint.metadata import _config_dict
    from jint8.loading.pretrained import _model_config_from_dict

    transformers = require_module("transformers")
    hf = transformers.FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                                   new_decoder_architecture=True, num_kv_heads=2, bias=True,
                                   rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})
    config = FalconConfig.from_hf_config(hf, dtype=jnp.float32)
    assert (config.num_kv_heads, config.norm_layout, config.rope.rope_type) == (2, "separate", "linear")
    fields, class_path = _config_dict(config, "model_config")
    assert _model_config_from_dict(class_path, json.loads(json.dumps(fields)), "ckpt") == config


@pytest.mark.parametrize("num_heads", [4, 6, 32, 71, 112])
def test_alibi_slopes_equal_transformers(num_heads):
    require_module("torch")
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    # one float32 ulp: jint8 rounds the exact power, torch's vectorised powf is within an ulp of it
    np.testing.assert_allclose(alibi_slopes(num_heads), _get_alibi_slopes(num_heads, "cpu").numpy(), rtol=2**-23)


@pytest.mark.parametrize("fields, message", [
    (dict(new_decoder_architecture=True, parallel_attn=False), "parallel_attn=False"),
    (dict(num_ln_in_parallel_attn=2), "num_ln_in_parallel_attn=2"),
    (dict(multi_query=False, num_kv_heads=2), "num_kv_heads=2"),
    (dict(activation="gelu_10"), "activation='gelu_10'"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "rope_type='dynamic'"),
])
def test_unsupported_falcon_configs_are_refused_naming_the_field(fields, message):
    transformers = require_module("transformers")
    hf = transformers.FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    for name, value in fields.items():  # after __post_init__, as a config.json would set them
        setattr(hf, name, value)
    with pytest.raises(UnsupportedArchitectureError, match=message):
        FalconConfig.from_hf_config(hf)


def test_from_pretrained_refuses_a_falcon_checkpoint_with_an_unsupported_flag(tmp_path):
    require_module("torch")
    torch_model("falcon_7b").save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(new_decoder_architecture=True, parallel_attn=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="parallel_attn"):
        jint8.from_pretrained(tmp_path, progress=False)
