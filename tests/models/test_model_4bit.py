"""The model families run 4-bit (NF4) trees end to end: forward, fuse_projections, generate (T5:
tests/models/test_t5.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, save_checkpoint

import jint8
from jint8 import Int4Config, Int4Weight, dequantize_params, quantize_params
from jint8.loading.pretrained import planned_bytes_per_device


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "opt", "bloom", "falcon_7b", "falcon_new"])
def test_model_families_run_4bit_trees(tmp_path, family):
    require_module("torch")
    save_checkpoint(family, tmp_path)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    # 4-bit tables where the head is lm_head (llama, falcon_new); tied tables stay float (lm_head skipped)
    q = quantize_params(params, Int4Config(min_size=0, quantize_embeddings=True))
    tables = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        q, is_leaf=lambda x: isinstance(x, Int4Weight))[0] if getattr(path[-1], "key", None) == "embedding"]
    assert all(isinstance(t, Int4Weight) == ("lm_head" in q) for t in tables) and tables
    assert any(isinstance(leaf, Int4Weight) for leaf in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, Int4Weight)))
    ids = jnp.asarray(random_ids(2, 7))
    logits = np.asarray(model.apply({"params": q}, ids)[0])
    back = dequantize_params(q)
    # the 4-bit tree computes what the float model does with bitsandbytes' dequantized weights
    # (float32 both ways; only the dot's summation order differs)
    np.testing.assert_allclose(logits, np.asarray(model.apply({"params": back}, ids)[0]), rtol=1e-5, atol=1e-5)
    if family == "llama":
        config = jint8.GenerationConfig(max_new_tokens=4)
        fused = jint8.fuse_projections(q)
        assert isinstance(fused["model"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"], Int4Weight)
        out = np.asarray(jint8.generate(model, fused, np.asarray(ids), config=config).sequences)
        assert out.shape == (2, 7 + 4)
        np.testing.assert_array_equal(out[:, 7], np.argmax(logits[:, -1], axis=-1))  # greedy's first token
        # each greedy token of the 4-bit tree (its table looked up row by row) is, in the
        # dequantized float model, a maximum within the same summation-order bound
        float_logits = np.asarray(model.apply({"params": back}, jnp.asarray(out[:, :-1]))[0])[:, 6:]
        chosen = np.take_along_axis(float_logits, out[:, 7:, None], axis=-1)[..., 0]
        assert np.all(chosen >= float_logits.max(axis=-1) - 2e-5 * (1 + np.abs(float_logits).max()))


def test_from_pretrained_plans_and_loads_4bit_tables(tmp_path):
    require_module("transformers")
    save_checkpoint("llama", tmp_path)
    config = Int4Config(min_size=0, quantize_embeddings=True)
    model, params = jint8.from_pretrained(tmp_path, quantization=config, dtype=jnp.float32, progress=False)
    table = params["model"]["embed_tokens"]["embedding"]
    _, floats = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    expected = quantize_params(floats, config)["model"]["embed_tokens"]["embedding"]
    assert isinstance(table, Int4Weight) and table.shape == (256, 64)
    for a, b in zip(jax.tree.leaves(table), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8), np.asarray(b).reshape(-1).view(np.uint8))
    assert jint8.param_bytes(params) == planned_bytes_per_device(tmp_path, quantization=config, dtype=jnp.float32)
