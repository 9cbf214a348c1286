"""The shared pieces: RoPE frequencies vs transformers, masks, GQA attention, cache, registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module

from jint8.errors import InvalidConfigError, UnsupportedArchitectureError
from jint8.models import (
    BloomForCausalLM,
    FalconForCausalLM,
    GemmaForCausalLM,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTForCausalLM,
    RopeConfig,
    init_cache,
    model_class_for,
)
from jint8.models.common import attention_mask, dot_product_attention, rope_inverse_frequencies


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_equal_transformers(rope_parameters):
    require_module("torch")
    transformers = require_module("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=16, rope_parameters=rope_parameters)
    ours = rope_inverse_frequencies(RopeConfig.from_hf_config(hf), 128)
    if rope_parameters["rope_type"] == "default":
        expected = 1.0 / (rope_parameters["rope_theta"] ** (np.arange(0, 128, 2) / 128))
    else:
        expected = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf)[0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_unsupported_rope_type_is_named():
    class Config:
        rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}

    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        RopeConfig.from_hf_config(Config())


def test_attention_mask_causal_cache_padding_and_window():
    kv_mask = jnp.array([[False, True, True, True, True, False]])
    mask = attention_mask(2, 6, cache_index=3, kv_mask=kv_mask, sliding_window=3)
    assert mask.shape == (1, 1, 2, 6)
    # query 0 sits in slot 3: window keeps slots 1..3, slot 0 is padding
    np.testing.assert_array_equal(mask[0, 0], [[False, True, True, True, False, False],
                                                [False, False, True, True, True, False]])


def test_gqa_attention_equals_repeated_heads_and_softcap_path():
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(2, 3, 4, 8), jnp.float32)
    k = jnp.asarray(rng.randn(2, 5, 2, 8), jnp.float32)
    v = jnp.asarray(rng.randn(2, 5, 2, 8), jnp.float32)
    mask = attention_mask(3, 5, cache_index=2)
    out = dot_product_attention(q, k, v, mask, scale=0.3)
    k_full, v_full = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k_full) * 0.3
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    expected = jnp.einsum("bhts,bshd->bthd", probs, v_full)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # a huge soft cap is the identity on these logits
    capped = dot_product_attention(q, k, v, mask, scale=0.3, logit_softcap=1e6)
    np.testing.assert_allclose(capped, expected, rtol=1e-5, atol=1e-6)


def test_init_cache_shape_and_dtype():
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=4)
    cache = init_cache(config, 2, 10)
    assert cache.k.shape == (3, 2, 10, 2, 4) and cache.k.dtype == jnp.bfloat16 and cache.max_length == 10


def test_config_validation_names_the_field():
    with pytest.raises(InvalidConfigError, match="num_kv_heads=3"):
        LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                    num_kv_heads=3, head_dim=4)


@pytest.mark.parametrize("model_type, expected", [
    ("llama", LlamaForCausalLM), ("mistral", LlamaForCausalLM), ("qwen2", LlamaForCausalLM),
    ("qwen3", LlamaForCausalLM), ("gemma", GemmaForCausalLM), ("gemma2", GemmaForCausalLM),
    ("gpt2", GPT2LMHeadModel), ("opt", OPTForCausalLM), ("bloom", BloomForCausalLM), ("falcon", FalconForCausalLM),
])
def test_registry_by_model_type(model_type, expected):
    class Config:
        pass

    Config.model_type = model_type
    assert model_class_for(Config()) is expected


def test_registry_names_unknown_architecture():
    class Config:
        model_type = "mamba"

    with pytest.raises(UnsupportedArchitectureError, match="'mamba'.*supported: .*llama"):
        model_class_for(Config())


def test_logits_to_keep_returns_the_last_positions():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jint8.models import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=16, dtype=jnp.float32)
    model = LlamaForCausalLM(config)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    params = model.init(jax.random.key(0), ids)["params"]
    full, _ = model.apply({"params": params}, ids)
    last, _ = model.apply({"params": params}, ids, logits_to_keep=2)
    assert last.shape == (2, 2, 50)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -2:]), rtol=1e-6, atol=1e-6)


def test_int8_embeddings_in_a_tied_llama_match_float_and_halve_the_table(tmp_path):
    import jint8

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, tie_word_embeddings=True, dtype=jnp.float32)
    model = LlamaForCausalLM(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 9)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    quant = jint8.Int8Config(min_size=0, quantize_embeddings=True)
    qparams = jint8.quantize_params(params, quant)
    table = qparams["model"]["embed_tokens"]["embedding"]
    assert isinstance(table, jint8.Int8Weight) and table.qvalue.dtype == jnp.int8
    ref, _ = model.apply({"params": params}, ids)
    got, _ = model.apply({"params": qparams}, ids)
    assert np.abs(np.asarray(got) - np.asarray(ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()
    without = jint8.quantize_params(params, jint8.Int8Config(min_size=0))
    saved = jint8.param_bytes(without) - jint8.param_bytes(qparams)
    assert saved == 512 * 64 * 4 - (512 * 64 + 512 * 4)  # f32 table -> int8 + one f32 scale per row
    # A jint8 checkpoint keeps the int8 table; bitsandbytes has no int8 embeddings: export refuses.
    jint8.save_quantized(tmp_path / "ckpt", qparams, quant_config=quant, model_config=config)
    restored, _ = jint8.load_quantized(tmp_path / "ckpt")
    again, _ = model.apply({"params": restored}, ids)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
    with pytest.raises(InvalidConfigError, match="embed_tokens/embedding"):
        jint8.export_bitsandbytes(model, qparams, tmp_path / "bnb")
