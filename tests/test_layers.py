"""Int8Dense as a drop-in for nn.Dense, and intercept() on a Linen model jint8 did not write."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint8
from jint8 import (
    GatedInput, Int8Config, Int8Dense, Int8Weight, dequantize_params, int8_matmul, quantize_params,
)
from jint8.layers import Int8Embed
from jint8.errors import ShapeError
from jint8.ops.int8_matmul import InputGate, int8_matmul_reference


def _x(rng, *shape, outlier_col=None):
    x = rng.standard_normal(shape).astype(np.float32)
    if outlier_col is not None:
        x[..., outlier_col] = 20.0
    return jnp.asarray(x)


def test_float_kernel_behaves_exactly_like_nn_dense(rng):
    x = _x(rng, 3, 5, 32)
    params = nn.Dense(48).init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        np.asarray(Int8Dense(48).apply(params, x)), np.asarray(nn.Dense(48).apply(params, x))
    )


def test_quantized_params_drop_in_and_match_the_op(rng):
    x = _x(rng, 4, 64, outlier_col=5)
    params = nn.Dense(96).init(jax.random.key(0), x)["params"]
    qparams = quantize_params(params, Int8Config(min_size=0))
    y, state = Int8Dense(96).apply({"params": qparams}, x, mutable=["int8_stats"])
    w = qparams["kernel"]
    expected, _ = int8_matmul_reference(
        x, w.qvalue, w.scale, params["bias"], threshold=6.0, outlier_capacity=64, weight_layout="nk"
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert int(state["int8_stats"]["max_outlier_columns"]) == 1
    y_float = nn.Dense(96).apply({"params": params}, x)
    assert float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float)) < 0.02


def test_bf16_compute_dtype(rng):
    x = _x(rng, 2, 64)
    params = quantize_params(nn.Dense(32).init(jax.random.key(0), x)["params"], Int8Config(min_size=0))
    y = Int8Dense(32, dtype=jnp.bfloat16).apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16


def test_capacity_overflow_is_counted(rng):
    x = _x(rng, 2, 64)
    x = x.at[:, jnp.arange(6)].set(30.0)
    params = quantize_params(
        nn.Dense(32).init(jax.random.key(0), x)["params"], Int8Config(min_size=0, outlier_capacity=2)
    )
    _, state = jax.jit(lambda p, x: Int8Dense(32).apply({"params": p}, x, mutable=["int8_stats"]))(params, x)
    assert int(state["int8_stats"]["capacity_overflows"]) == 1
    assert int(state["int8_stats"]["max_outlier_columns"]) == 6


class TinyTransformer(nn.Module):
    """A small Linen transformer block written with plain flax layers (not jint8's)."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        q = nn.DenseGeneral((4, 16), name="query")(h)
        k = nn.DenseGeneral((4, 16), name="key")(h)
        v = nn.DenseGeneral((4, 16), name="value")(h)
        attn = nn.dot_product_attention(q, k, v)
        x = x + nn.DenseGeneral(64, axis=(-2, -1), name="out")(attn)
        h = nn.LayerNorm()(x)
        h = nn.Dense(256, name="up")(h)
        return x + nn.Dense(64, name="down")(nn.gelu(h))


def test_intercept_runs_unmodified_linen_model_in_int8(rng):
    model = TinyTransformer()
    x = _x(rng, 2, 8, 64, outlier_col=3)
    params = model.init(jax.random.key(0), x)["params"]
    qparams = quantize_params(params, Int8Config(min_size=0))
    with jint8.intercept():
        y, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["int8_stats"]))(qparams, x)
    stats = state["int8_stats"]
    assert set(stats) == {"query", "key", "value", "out", "up", "down"}  # every projection ran int8
    y_float = model.apply({"params": params}, x)
    rel = float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float))
    assert 0 < rel < 0.02
    # Reference-level check of one projection: the interceptor computes what the op computes.
    with jint8.intercept():
        up = nn.Dense(256).apply({"params": qparams["up"]}, x)
    w = qparams["up"]["kernel"]
    expected, _ = int8_matmul_reference(
        x.reshape(-1, 64), w.qvalue, w.scale, params["up"]["bias"], threshold=6.0, outlier_capacity=64,
        weight_layout="nk",
    )
    np.testing.assert_array_equal(np.asarray(up).reshape(-1, 256), np.asarray(expected))


def test_intercept_leaves_float_params_alone(rng):
    model = TinyTransformer()
    x = _x(rng, 1, 4, 64)
    params = model.init(jax.random.key(0), x)["params"]
    with jint8.intercept():
        y = model.apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(model.apply({"params": params}, x)))


def test_intercept_rejects_mismatched_contracting_axes(rng):
    x = _x(rng, 2, 4, 16)
    dense = nn.DenseGeneral(32, axis=(-2, -1))
    params = dense.init(jax.random.key(0), x)["params"]
    # Force the wrong split: in_ndim=1 on a kernel whose module contracts two axes.
    qparams = quantize_params(params, Int8Config(min_size=0, in_ndim_overrides={"re:.*": 1}))
    assert isinstance(qparams["kernel"], Int8Weight) and qparams["kernel"].in_ndim == 1
    with jint8.intercept(), pytest.raises(ShapeError, match="in_ndim"):
        dense.apply({"params": qparams}, x)


def test_int8_embedding_lookup_and_tied_head():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((300, 64)).astype(np.float32))
    params = {"embedding": table}
    assert not isinstance(quantize_params(params, Int8Config(min_size=0))["embedding"], Int8Weight)  # off by default
    q = quantize_params(params, Int8Config(min_size=0, quantize_embeddings=True))
    w = q["embedding"]
    assert isinstance(w, Int8Weight) and w.qvalue.shape == (300, 64) and w.scale.shape == (300,)
    np.testing.assert_array_equal(w.scale, np.abs(np.asarray(table)).max(axis=1))  # one scale per token row
    module = Int8Embed(300, 64)
    ids = jnp.asarray([[0, 5, 299], [7, 7, 1]])
    got = module.apply({"params": q}, ids)
    np.testing.assert_array_equal(got, dequantize_params(q)["embedding"][ids])
    step = np.asarray(w.scale)[np.asarray(ids)][..., None] / 127
    assert np.all(np.abs(np.asarray(got) - np.asarray(table)[np.asarray(ids)]) <= step / 2 * (1 + 1e-5))
    # attend (a tied output head) is LLM.int8() on the table, which is already K-major [V, H].
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[:, 7] = 9.0
    logits = module.apply({"params": q}, jnp.asarray(x), method=Int8Embed.attend)
    expected = int8_matmul(jnp.asarray(x), w.qvalue, w.scale, threshold=6.0, outlier_capacity=64, weight_layout="nk")
    np.testing.assert_array_equal(logits, expected)
    float_logits = x @ np.asarray(table).T
    assert np.abs(np.asarray(logits) - float_logits).max() < 0.02 * np.abs(float_logits).max()


def test_gated_input_folds_into_int8_dense_at_decode_rows_and_gives_the_same_bits(rng, monkeypatch):
    """Int8Dense hands a GatedInput's gate to int8_matmul (gate=), whose backend gets it at <=
    FUSED_GATE_MAX_M rows and the op applies it first above; either way the result has the
    bits of the layer on gate(gate_up)."""
    from jint8.ops.int8_matmul import api, configs

    FUSED_GATE_MAX_M = 1  # the default, 0, never folds (measured slower on the H100)
    monkeypatch.setattr(configs, "FUSED_GATE_MAX_M", FUSED_GATE_MAX_M)
    k = 48
    qparams = quantize_params(nn.Dense(32).init(jax.random.key(0), jnp.ones((1, k)))["params"],
                              Int8Config(min_size=0))
    gates = []
    real = next(b for b in api._BACKENDS if b.name == "xla")

    def spy(*args, gate=None, **kwargs):
        gates.append(gate)
        return real.impl(*args, gate=gate, **kwargs)

    monkeypatch.setattr(api, "_BACKENDS", [api.Backend("spy", spy, lambda x, w: None)])
    monkeypatch.delenv("JINT8_BACKEND", raising=False)
    gate = InputGate("silu")
    dense = Int8Dense(32, dtype=jnp.bfloat16)
    for rows in (FUSED_GATE_MAX_M, FUSED_GATE_MAX_M + 2):
        gate_up = _x(rng, rows, 2 * k, outlier_col=3).astype(jnp.bfloat16)  # silu(20) * up: outliers
        inputs = GatedInput(gate_up, gate, jnp.dtype(jnp.bfloat16))
        assert inputs.shape == (rows, k)
        gates.clear()
        y = dense.apply({"params": qparams}, inputs)
        assert gates == ([gate] if rows <= FUSED_GATE_MAX_M else [None])
        np.testing.assert_array_equal(np.asarray(y), np.asarray(dense.apply({"params": qparams}, gate(gate_up))))


def test_gated_input_on_a_float_kernel_is_applied_first(rng):
    gate_up = _x(rng, 2, 3, 2 * 16)
    params = nn.Dense(8).init(jax.random.key(0), jnp.ones((1, 16)))
    gate = InputGate("silu")
    y = Int8Dense(8).apply(params, GatedInput(gate_up, gate, jnp.dtype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(nn.Dense(8).apply(params, gate(gate_up))))


@pytest.mark.parametrize("quantized", [False, True])
def test_int8_dense_output_gate_returns_the_gated_product(quantized):
    """Int8Dense(output_gate="silu") on a gate|up kernel [K, 2I]: act(gate) * up [..., I], the
    same bits as OutputGate applied to the plain layer's [..., 2I] output (float or int8)."""
    from jint8.ops.int8_matmul.reference import OutputGate

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16)) * 3.0, jnp.bfloat16)
    plain = Int8Dense(12, dtype=jnp.bfloat16)
    params = plain.init(jax.random.key(0), x)["params"]
    params["bias"] = params["bias"] + 0.5
    if quantized:
        params = jint8.quantize_params({"dense": params}, jint8.Int8Config(min_size=0))["dense"]
    assert isinstance(params["kernel"], Int8Weight) == quantized
    gated = Int8Dense(12, dtype=jnp.bfloat16, output_gate="silu").apply({"params": params}, x)
    want = OutputGate("silu")(plain.apply({"params": params}, x))
    assert gated.shape == (2, 3, 6)
    np.testing.assert_array_equal(np.asarray(gated, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ShapeError, match="output_gate='silu' needs an even features"):
        Int8Dense(11, output_gate="silu").init(jax.random.key(0), x)


def test_split_partials_without_a_splitting_plan_is_the_result_as_one_partial(rng):
    """Int8Dense(split_partials=True) on a float kernel, and on an int8 one whose backend has no
    split-K partials to hand over (the XLA reference): [1, ..., features], the result itself."""
    x = _x(rng, 2, 3, 64, outlier_col=7)
    params = nn.Dense(40).init(jax.random.key(0), x)["params"]
    for tree in (params, quantize_params(params, Int8Config(min_size=0))):
        y = Int8Dense(40).apply({"params": tree}, x)
        parts = Int8Dense(40).apply({"params": tree}, x, split_partials=True)
        assert parts.shape == (1, 2, 3, 40) and parts.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(parts[0]), np.asarray(y))
    w = quantize_params(params, Int8Config(min_size=0))["kernel"]
    parts = int8_matmul(x, w.qvalue, w.scale, weight_layout="nk", split_partials=True)
    np.testing.assert_array_equal(np.asarray(parts[0]),
                                  np.asarray(int8_matmul(x, w.qvalue, w.scale, weight_layout="nk")))
