"""bitsandbytes 4-bit checkpoints (transformers load_in_4bit + save_pretrained) load as Int4Weight
with the codes as stored, computing what bitsandbytes' own CPU forward computes; Int4Config
quantizes float checkpoints while loading to the same codes; bad 4-bit files are refused by name."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, save_checkpoint, torch_logits

import jint8
from jint8.errors import CheckpointFileError

CASES = [("llama", "nf4", True), ("llama", "fp4", False), ("qwen2", "nf4", False), ("qwen2", "fp4", True)]


def _without_avx512_bf16_kernel(model):
    # bitsandbytes' dequantize-then-matmul forward (its default gemm_4bit); on AVX512-BF16 CPUs
    # its inference forward otherwise repacks the weights for a fused bf16 kernel
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _checkpoints(tmp_path_factory, family, quant_type, double_quant):
    require_module("torch")
    require_module("bitsandbytes")
    transformers = require_module("transformers")
    float_dir, bnb_dir = tmp_path_factory.mktemp("float"), tmp_path_factory.mktemp("bnb4")
    save_checkpoint(family, float_dir)
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=double_quant)
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=bnb_config,
                                                                  device_map="cpu")
    bnb_model.save_pretrained(bnb_dir)
    return float_dir, bnb_dir, bnb_model


@pytest.fixture(scope="module", params=CASES, ids=["-".join(map(str, c)) for c in CASES])
def float_and_bnb4_dirs(tmp_path_factory, request):
    return (*_checkpoints(tmp_path_factory, *request.param), request.param)


def test_bnb_4bit_checkpoint_loads_as_stored_and_matches_bitsandbytes_forward(float_and_bnb4_dirs):
    transformers = require_module("transformers")
    float_dir, bnb_dir, bnb_model, (family, quant_type, double_quant) = float_and_bnb4_dirs
    model, params = jint8.from_pretrained(bnb_dir, dtype=jnp.float32, progress=False)
    layer = params["model"]["layers_1"]
    stored = bnb_model.model.layers[1].mlp.down_proj.weight
    down = layer["mlp"]["down_proj"]["kernel"]
    assert isinstance(down, jint8.Int4Weight) and down.shape == tuple(stored.quant_state.shape)
    assert (down.quant_type, down.double_quant, down.blocksize) == (quant_type, double_quant, 64)
    np.testing.assert_array_equal(np.asarray(down.packed), stored.data.numpy())  # no re-quantization
    np.testing.assert_array_equal(np.asarray(down.absmax), stored.quant_state.absmax.numpy())
    assert not isinstance(params["lm_head"]["kernel"], jint8.Int4Weight)  # transformers skips lm_head

    ids = random_ids(2, 7)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
    scale = np.max(np.abs(logits))
    reloaded = _without_avx512_bf16_kernel(transformers.AutoModelForCausalLM.from_pretrained(bnb_dir, device_map="cpu"))
    # Same dequantized weights (bit-identical, tests/test_quant4.py), float32 on both sides: only
    # the summation order of each dot differs (relative K u ~ 1e-5 per matmul, through two layers
    # and the norms); measured <= 4e-7 of the logit scale. 4-bit itself moves logits ~3e-2.
    assert np.max(np.abs(logits - torch_logits(reloaded, ids))) <= 1e-4 * scale
    # and bitsandbytes' forward as it runs on this CPU (with AVX512-BF16: its fused kernel with a
    # bf16 absmax, relative rounding 2^-9 of every weight; measured ~1e-3 of the scale)
    assert np.max(np.abs(logits - torch_logits(bnb_model, ids))) <= 1e-2 * scale

    # the float checkpoint quantized while loading gets bitsandbytes' codes (transformers
    # quantized the same float32 weights); the double-quantized offset is a float32 mean whose
    # summation order is jnp's, so there the absmax compare in value
    config = jint8.Int4Config(quant_type=quant_type, double_quant=double_quant, min_size=0)
    _, quantized = jint8.from_pretrained(float_dir, dtype=jnp.float32, quantization=config, progress=False)
    ours = quantized["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(ours.packed), np.asarray(down.packed))
    np.testing.assert_allclose(np.asarray(ours.block_absmax()), np.asarray(down.block_absmax()), rtol=1e-5)
    is_weight = lambda x: isinstance(x, jint8.Int4Weight)  # noqa: E731
    assert jax.tree.structure(quantized, is_leaf=is_weight) == jax.tree.structure(params, is_leaf=is_weight)
    if (family, double_quant) == ("llama", True):
        # its 16-bit table quantized while loading, the kernels still as stored
        config = jint8.Int4Config(quant_type=quant_type, quantize_embeddings=True)
        _, with_table = jint8.from_pretrained(bnb_dir, dtype=jnp.float32, quantization=config, progress=False)
        table = with_table["model"]["embed_tokens"]["embedding"]
        expected = jint8.quantize_params(params, config)["model"]["embed_tokens"]["embedding"]
        assert isinstance(table, jint8.Int4Weight) and table.quant_type == quant_type
        np.testing.assert_array_equal(np.asarray(table.packed), np.asarray(expected.packed))
        np.testing.assert_array_equal(np.asarray(table.dequantize()), np.asarray(expected.dequantize()))
        np.testing.assert_array_equal(np.asarray(with_table["model"]["layers_1"]["mlp"]["down_proj"]["kernel"].packed),
                                      np.asarray(down.packed))


def _rewrite(bnb_dir, tmp_path, edit):
    """A copy of the 4-bit checkpoint with edit(tensors) applied to its safetensors file."""
    import shutil

    from safetensors.numpy import load_file, save_file

    target = tmp_path / "edited"
    shutil.copytree(bnb_dir, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _set_state(tensors, key, **fields):
    state = json.loads(tensors[key].tobytes())
    state.update(fields)
    tensors[key] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()


def test_bad_4bit_checkpoints_are_refused_naming_the_tensor(tmp_path_factory, tmp_path):
    _, bnb_dir, _ = _checkpoints(tmp_path_factory, "llama", "nf4", True)
    q = "model.layers.0.self_attn.q_proj.weight"
    state_key = f"{q}.quant_state.bitsandbytes__nf4"
    cases = [
        (lambda t: t.pop(f"{q}.absmax"), rf"has no '{q}\.absmax' tensor"),
        (lambda t: t.pop(state_key), rf"{q}' has no '{q}\.quant_state\.bitsandbytes__<nf4\|fp4>'"),
        (lambda t: _set_state(t, state_key, blocksize=48), r"q_proj\.weight'.*blocksize=48 must be one of"),
        (lambda t: _set_state(t, state_key, quant_type="int4"), r"quant_state\.bitsandbytes__nf4'.*quant_type='int4'"),
        (lambda t: _set_state(t, state_key, shape=[64, 32]), r"q_proj\.weight'.*packed: shape \(2048, 1\) must be \(1024, 1\)"),
        (lambda t: t.pop(f"{q}.nested_quant_map"), r"has nested_absmax but no .*nested_quant_map"),
        (lambda t: t.update({f"{q}.absmax": t[f"{q}.absmax"][:-1]}), r"q_proj\.weight'.*absmax: shape \(63,\) must be \(64,\)"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(CheckpointFileError, match=message):
            jint8.from_pretrained(_rewrite(bnb_dir, tmp_path / str(i), edit), progress=False)
    with pytest.raises(jint8.errors.InvalidConfigError, match="4-bit checkpoint; quantization=Int8Config"):
        jint8.from_pretrained(bnb_dir, quantization=jint8.Int8Config(), progress=False)
