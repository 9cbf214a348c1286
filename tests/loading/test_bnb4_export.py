"""export_bitsandbytes of a 4-bit tree writes a load_in_4bit checkpoint that transformers loads with
bitsandbytes, computing jint8's logits, and that loads back into jint8 bit for bit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, save_checkpoint, torch_logits

import jint8
from jint8.export import export_bitsandbytes


@pytest.mark.parametrize("family,quant_type,double_quant", [("llama", "nf4", True), ("qwen2", "fp4", False)])
def test_exported_4bit_checkpoint_loads_in_transformers_bitsandbytes(tmp_path, family, quant_type, double_quant):
    require_module("torch")
    require_module("bitsandbytes")
    transformers = require_module("transformers")
    save_checkpoint(family, tmp_path / "float")
    config = jint8.Int4Config(quant_type=quant_type, double_quant=double_quant, min_size=0)
    model, params = jint8.from_pretrained(tmp_path / "float", dtype=jnp.float32, quantization=config, progress=False)
    out = export_bitsandbytes(model, params, tmp_path / "bnb4")
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (meta["load_in_4bit"], meta["bnb_4bit_quant_type"], meta["bnb_4bit_use_double_quant"]) == (
        True, quant_type, double_quant)
    assert meta["llm_int8_skip_modules"] == ["lm_head"]

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    for module in theirs.modules():  # bitsandbytes' dequantize-then-matmul forward (see test_bnb_int4_loading)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    down = theirs.model.layers[1].mlp.down_proj.weight
    ours = params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(down.data.numpy(), np.asarray(ours.packed))  # codes as written
    assert down.quant_state.quant_type == quant_type and down.quant_state.nested == double_quant
    ids = random_ids(2, 9)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
    # same dequantized weights, float32 both sides: summation order only (as in test_bnb_int4_loading)
    assert np.max(np.abs(logits - torch_logits(theirs, ids))) <= 1e-4 * np.max(np.abs(logits))

    _, again = jint8.from_pretrained(out, dtype=jnp.float32, progress=False)
    is_weight = lambda x: isinstance(x, jint8.Int4Weight)  # noqa: E731
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(again, is_leaf=is_weight) == jax.tree.structure(params, is_leaf=is_weight)
    mixed = dict(params, lm_head={"kernel": jint8.quantize_vectorwise(params["lm_head"]["kernel"])})
    with pytest.raises(jint8.errors.InvalidConfigError, match="mix int8 and 4-bit kernels"):
        export_bitsandbytes(model, mixed, tmp_path / "mixed")
