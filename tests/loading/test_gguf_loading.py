"""GGUF: a tiny llama.cpp-style file (Q/K permuted, quantized blocks) loads to the model it came from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, torch_logits, torch_model
from tiny_gguf import write_llama_gguf

import jint8
from jint8.errors import CheckpointFileError, UnsupportedQuantTypeError
from jint8.loading import load_tokenizer

# Bound of the file's own quantization vs the float model: Q8_0 rounds each weight to 1/254 of
# its 32-block absmax (~0.5 % of logits measured), F16 to 2^-11 relative; Q4_0/Q4_1 to 1/16 of a
# block's range (~8 % measured on these random weights).
FILE_BOUND = {"F32": 1e-5, "F16": 1e-3, "Q8_0": 2e-2, "Q4_0": 0.25, "Q4_1": 0.25}


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def tiny_llama():
    require_module("torch")
    return torch_model("smollm2")  # GQA 4:1 and tied embeddings, like SmolLM2


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_logits_equal_transformers_gguf_loading_and_are_bounded_vs_float(tiny_llama, quant, tmp_path):
    torch = require_module("torch")
    transformers = require_module("transformers")
    path = tmp_path / f"tiny-{quant}.gguf"
    write_llama_gguf(tiny_llama, path, quant=quant)
    model, params = jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
    ids = random_ids(2, 9)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
    # transformers dequantizes the same file with its own name map and reverse permutation
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert relative_error(logits, torch_logits(reference, ids)) <= 1e-4
    assert relative_error(logits, torch_logits(tiny_llama, ids)) <= FILE_BOUND[quant]


@pytest.mark.parametrize("quant", ["F16", "BF16", "Q8_0"])
def test_gguf_float_tensors_go_to_the_device_as_stored_views(tiny_llama, quant, tmp_path, monkeypatch):
    """F16 / BF16 projections reach the device in their stored dtype, as views of the mapped file
    (the rotary-permuted attn_q / attn_k too: the conversion undoes the permutation on the
    device); block-quantized ones dequantized to float32.
    A BF16 file loads bit for bit as the bfloat16 safetensors checkpoint of the same model."""
    import ml_dtypes

    import jint8.loading.pretrained as pretrained

    path = tmp_path / f"tiny-{quant}.gguf"
    write_llama_gguf(tiny_llama, path, quant=quant)
    staged, stage = [], pretrained.stage
    monkeypatch.setattr(pretrained, "stage", lambda array, conversion: staged.append(array) or stage(array, conversion))
    _, params = jint8.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    kernels = [a for a in staged if a.ndim == 2 and a.shape[0] != tiny_llama.config.vocab_size]  # no embedding
    stored = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "Q8_0": np.float32}[quant]
    assert kernels and all(a.dtype == stored for a in kernels)
    views = [a for a in kernels if not a.flags.writeable]  # the map is read-only; a host copy is not
    if quant == "Q8_0":
        assert not views
    else:  # no host copy, not even of the 2 permuted projections per layer
        assert len(views) == len(kernels)
    if quant == "BF16":
        torch = require_module("torch")
        tiny_llama.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
        tiny_llama.to(torch.float32)
        _, expected = jint8.from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16, progress=False)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, expected)


def test_qwen2_gguf_without_rotary_permutation_equals_transformers(tmp_path):
    torch = require_module("torch")
    transformers = require_module("transformers")
    qwen2 = torch_model("qwen2")  # q/k/v biases; llama.cpp does not permute qwen2's Q/K
    path = tmp_path / "qwen2.gguf"
    write_llama_gguf(qwen2, path, quant="F32", arch="qwen2")
    model, params = jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
    assert model.config.model_type == "qwen2" and model.config.qkv_bias
    ids = random_ids(2, 9)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert relative_error(logits, torch_logits(reference, ids)) <= 1e-4
    assert relative_error(logits, torch_logits(qwen2, ids)) <= 1e-4


def test_gguf_int8_quantized_while_loading(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny_llama, path, quant="F32")
    model, params = jint8.from_pretrained(path, dtype=jnp.float32, progress=False,
                                          quantization=jint8.Int8Config())
    q_proj = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, jint8.Int8Weight) and q_proj.qvalue.dtype == jnp.int8
    ids = random_ids(1, 9)
    logits = model.apply({"params": params}, jnp.asarray(ids))[0]
    assert relative_error(logits, torch_logits(tiny_llama, ids)) <= 6e-2


def test_gguf_tokenizer_comes_from_the_file(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny_llama, path, quant="F16")
    tokenizer = load_tokenizer(path)
    assert tokenizer.convert_ids_to_tokens([5, 7]) == ["<t5>", "<t7>"]


def test_unsupported_gguf_quant_type_names_file_and_tensor(tiny_llama, tmp_path):
    gguf = require_module("gguf")
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny_llama, path, quant="F32")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for field in reader.fields.values():  # copy metadata except the header fields
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0],
                             sub_type=field.types[-1] if len(field.types) > 1 else None)
    iq4 = gguf.GGMLQuantizationType.IQ4_NL
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.name == "blk.1.ffn_up.weight":
            rows, cols = data.shape
            writer.add_tensor(tensor.name, np.zeros((rows, cols // 32 * 18), np.uint8), raw_dtype=iq4)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = len(jax.live_arrays())
    with pytest.raises(UnsupportedQuantTypeError, match=r"iq\.gguf.*blk\.1\.ffn_up\.weight.*IQ4_NL"):
        jint8.from_pretrained(tmp_path / "iq.gguf", dtype=jnp.float32, progress=False)
    assert len(jax.live_arrays()) == before


def test_truncated_gguf_is_a_clear_error(tiny_llama, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(tiny_llama, path, quant="Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(CheckpointFileError, match="tiny.gguf"):
        jint8.from_pretrained(path, dtype=jnp.float32, progress=False)


def test_gguf_without_torch_says_torch_is_needed(tmp_path, monkeypatch):
    import importlib.util

    from jint8.errors import CheckpointFileError
    from jint8.loading.gguf_file import gguf_hf_config

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CheckpointFileError, match="m.gguf.*needs torch"):
        gguf_hf_config(gguf)
