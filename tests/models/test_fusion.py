"""fuse_projections: one q|k|v and one gate|up matmul per Llama layer, same results as the parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

import jint8
from jint8.errors import InvalidConfigError
from jint8.models import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, qkv_bias=True, dtype=jnp.float32)


def _model_and_params(rng):
    model = LlamaForCausalLM(CONFIG)
    ids = jnp.asarray(rng.integers(0, 300, (2, 9)), jnp.int32)
    return model, model.init(jax.random.key(0), ids)["params"], ids


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_model_equals_unfused_logits_and_greedy_tokens(rng, quantized):
    model, params, ids = _model_and_params(rng)
    if quantized:
        params = jint8.quantize_params(params, jint8.Int8Config(min_size=0, threshold=1.0))
    fused = jint8.fuse_projections(params)
    attn, mlp = fused["model"]["layers_1"]["self_attn"], fused["model"]["layers_1"]["mlp"]
    assert sorted(attn) == ["o_proj", "qkv_proj"] and sorted(mlp) == ["down_proj", "gate_up_proj"]
    assert attn["qkv_proj"]["bias"].shape == (64 + 2 * 32,)
    if quantized:  # K-major int8 rows of q, k, v stacked; one scale per output feature
        parts = params["model"]["layers_1"]["self_attn"]
        np.testing.assert_array_equal(
            attn["qkv_proj"]["kernel"].qvalue,
            np.concatenate([parts[n]["kernel"].qvalue for n in ("q_proj", "k_proj", "v_proj")]))
        assert attn["qkv_proj"]["kernel"].shape == (64, 128)
    want, _ = model.apply({"params": params}, ids)
    got, _ = model.apply({"params": fused}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    config = jint8.GenerationConfig(max_new_tokens=6)
    np.testing.assert_array_equal(jint8.generate(model, fused, np.asarray(ids), config=config).sequences,
                                  jint8.generate(model, params, np.asarray(ids), config=config).sequences)


def test_parts_with_different_int8_settings_stay_separate_and_fusing_is_idempotent(rng):
    _, params, _ = _model_and_params(rng)
    config = jint8.Int8Config(min_size=0, threshold_overrides={"v_proj": 2.0})
    fused = jint8.fuse_projections(jint8.quantize_params(params, config))
    layer = fused["model"]["layers_0"]
    assert sorted(layer["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]  # v's threshold differs
    assert "gate_up_proj" in layer["mlp"]
    again = jint8.fuse_projections(fused)
    assert jax.tree.structure(again) == jax.tree.structure(fused)
    frozen = jint8.fuse_projections(FrozenDict(params))
    assert isinstance(frozen, FrozenDict) and "qkv_proj" in frozen["model"]["layers_0"]["self_attn"]


def test_export_refuses_fused_params(rng, tmp_path):
    model, params, _ = _model_and_params(rng)
    fused = jint8.fuse_projections(jint8.quantize_params(params, jint8.Int8Config(min_size=0)))
    with pytest.raises(InvalidConfigError, match="fuse_projections"):
        jint8.export_bitsandbytes(model, fused, tmp_path / "out")
