"""bitsandbytes 8-bit checkpoints (transformers load_in_8bit + save_pretrained) load as Int8Weight
without re-quantization, equal to jint8's own quantization of the float checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, save_checkpoint, torch_logits

import jint8


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def float_and_bnb_dirs(tmp_path_factory, request):
    require_module("torch")
    require_module("bitsandbytes")
    transformers = require_module("transformers")
    float_dir, bnb_dir = tmp_path_factory.mktemp("float"), tmp_path_factory.mktemp("bnb8")
    save_checkpoint(request.param, float_dir)
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    bnb_model.save_pretrained(bnb_dir)
    return float_dir, bnb_dir, bnb_model


def test_bnb_int8_kernels_are_taken_as_stored(float_and_bnb_dirs):
    _, bnb_dir, bnb_model = float_and_bnb_dirs
    model, params = jint8.from_pretrained(bnb_dir, dtype=jnp.float32, progress=False)
    q_proj = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, jint8.Int8Weight) and q_proj.threshold == 6.0
    stored = bnb_model.model.layers[0].self_attn.q_proj.weight
    np.testing.assert_array_equal(q_proj.qvalue, stored.CB.numpy())
    np.testing.assert_array_equal(q_proj.scale, stored.SCB.numpy())
    assert not isinstance(params["lm_head"]["kernel"], jint8.Int8Weight)  # bnb skips lm_head


def test_bnb_checkpoint_equals_jint8_quantization_of_the_float_checkpoint(float_and_bnb_dirs):
    float_dir, bnb_dir, bnb_model = float_and_bnb_dirs
    config = jint8.Int8Config(skip_modules=("lm_head",))
    _, from_bnb = jint8.from_pretrained(bnb_dir, dtype=jnp.float32, quantization=config, progress=False)
    model, from_float = jint8.from_pretrained(float_dir, dtype=jnp.float32, quantization=config, progress=False)
    is_weight = lambda x: isinstance(x, jint8.Int8Weight)  # noqa: E731
    for ours, theirs in zip(jax.tree.leaves(from_float, is_leaf=is_weight), jax.tree.leaves(from_bnb, is_leaf=is_weight)):
        if is_weight(ours):
            # same recipe (per-output absmax, round half to even), but transformers casts the
            # weights to float16 before bitsandbytes quantizes them: SCB is a float16 value
            # (relative rounding <= 2^-11) and a few int8 values move by one step
            assert np.max(np.abs(np.asarray(ours.qvalue, np.int32) - np.asarray(theirs.qvalue, np.int32))) <= 1
            np.testing.assert_allclose(ours.scale, theirs.scale, rtol=2**-11)
    ids = random_ids(2, 7)
    logits_bnb = np.asarray(model.apply({"params": from_bnb}, jnp.asarray(ids))[0])
    logits_float = np.asarray(model.apply({"params": from_float}, jnp.asarray(ids))[0])
    scale = np.max(np.abs(logits_float))
    # measured: llama 1.8e-3, qwen2 6.3e-3 (its random q/k/v biases make the tiny model more
    # sensitive to one-step int8 changes, as in test_bnb_export); bound 1e-2 of the logit scale
    assert np.max(np.abs(logits_bnb - logits_float)) <= 1e-2 * scale
    # and close to bitsandbytes' own LLM.int8() forward of the same int8 weights (CPU backend):
    # both quantize activations per row with threshold 6; differences are float summation order
    # and the 1/127 rounding of activations where the two paths round differently
    assert np.max(np.abs(logits_bnb - torch_logits(bnb_model, ids))) <= 1e-2 * scale  # llama 1.7e-3


@pytest.mark.parametrize("quantization_config,message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "4-bit"),
])
def test_other_quantization_methods_are_refused_naming_the_config(tmp_path, quantization_config, message):
    import json

    require_module("torch")
    save_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(jint8.errors.CheckpointFileError, match=message):
        jint8.from_pretrained(tmp_path, progress=False)
