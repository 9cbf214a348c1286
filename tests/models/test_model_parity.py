"""Every family: logits equal transformers' PyTorch forward (float32), int8 logits within a bound,
and the KV-cache path (prefill + one-token decode steps, left padding) equal the no-cache forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, save_checkpoint, torch_logits

import jint8
from jint8.models import init_cache

FAMILIES = ["llama", "llama3_rope", "mistral", "qwen2", "qwen3", "smollm2", "gemma", "gemma2", "gpt2", "opt",
            "bloom", "falcon_7b", "falcon_new", "falcon_rw"]

# float32 vs float32: both sides sum the same products in different orders; 2 layers of width
# 64 leave ~1e-6 relative differences, 1e-4 is the bar.
FLOAT_RTOL = 1e-4
# int8: weights and activations are each rounded to 1/254 of their row/column absmax. For these
# random N(0, 0.02) weights and unit-RMS activations absmax/rms ~ 3-4, so one matmul's output is
# off by ~2 * 3.5 / 254 ~ 3 % of its RMS at worst; errors of independent roundings add in
# quadrature across the 7 matmuls of a layer chain and the logits' max normalises them: measured
# 0.1-2.8 % over the families (Gemma 2 the largest), bound 6 %.
INT8_RTOL = 6e-2


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory):
    require_module("torch")
    directory = tmp_path_factory.mktemp(request.param)
    torch_model = save_checkpoint(request.param, directory)
    model, params = jint8.from_pretrained(directory, dtype=jnp.float32, progress=False)
    return request.param, directory, torch_model, model, params


def test_float32_logits_equal_transformers(family_checkpoint):
    _, _, torch_model, model, params = family_checkpoint
    ids = random_ids(2, 9)
    logits, cache = model.apply({"params": params}, jnp.asarray(ids))
    assert cache is None and logits.dtype == jnp.float32 and logits.shape == (2, 9, 256)
    assert relative_error(logits, torch_logits(torch_model, ids)) <= FLOAT_RTOL


def test_int8_logits_within_bound_of_transformers(family_checkpoint):
    _, directory, torch_model, _, _ = family_checkpoint
    model, params = jint8.from_pretrained(directory, dtype=jnp.float32, progress=False,
                                          quantization=jint8.Int8Config(threshold=6.0))
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jint8.Int8Weight))
    assert sum(isinstance(leaf, jint8.Int8Weight) for leaf in leaves) >= 8
    ids = random_ids(2, 9)
    logits, _ = model.apply({"params": params}, jnp.asarray(ids))
    assert relative_error(logits, torch_logits(torch_model, ids)) <= INT8_RTOL


def test_cache_prefill_then_decode_equals_no_cache_forward(family_checkpoint):
    _, _, _, model, params = family_checkpoint
    ids = jnp.asarray(random_ids(2, 8, seed=1))
    full, _ = model.apply({"params": params}, ids)
    cache = init_cache(model.config, 2, 12, jnp.float32)
    step_logits, cache = model.apply({"params": params}, ids[:, :5], cache=cache, cache_index=jnp.int32(0))
    pieces = [step_logits]
    for t in range(5, 8):
        step_logits, cache = model.apply({"params": params}, ids[:, t : t + 1], cache=cache,
                                         cache_index=jnp.int32(t))
        pieces.append(step_logits)
    assert cache.k.shape == (model.config.num_layers, 2, 12, model.config.num_kv_heads, model.config.head_dim)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_cache_rows_equal_unpadded_forward(family_checkpoint):
    _, _, torch_model, model, params = family_checkpoint
    ids = random_ids(2, 6, seed=2)
    pad = 2  # row 0 is left-padded by 2 slots; row 1 is full
    mask = np.ones((2, 6), bool)
    mask[0, :pad] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    max_len = 9
    kv_mask = np.zeros((2, max_len), bool)
    kv_mask[:, :6] = mask
    cache = init_cache(model.config, 2, max_len, jnp.float32)
    prefill, cache = model.apply({"params": params}, jnp.asarray(ids), positions=jnp.asarray(positions),
                                 cache=cache, cache_index=jnp.int32(0), kv_mask=jnp.asarray(kv_mask))
    next_ids = random_ids(2, 1, seed=3)
    kv_mask[:, 6] = True
    step, _ = model.apply({"params": params}, jnp.asarray(next_ids), positions=jnp.asarray(positions[:, -1:] + 1),
                          cache=cache, cache_index=jnp.int32(6), kv_mask=jnp.asarray(kv_mask))
    for row in range(2):
        real = np.concatenate([ids[row][mask[row]], next_ids[row]])[None]
        expected = torch_logits(torch_model, real)[0]
        got = np.concatenate([np.asarray(prefill[row])[mask[row]], np.asarray(step[row])])
        assert relative_error(got, expected) <= FLOAT_RTOL
