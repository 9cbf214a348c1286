"""quantize_vectorwise, Int8Config and the quantize_params / dequantize_params tree transforms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import freeze

import jint8
from jint8 import Int8Config, Int8Weight, dequantize_params, quantize_params, quantize_vectorwise
from jint8.errors import InvalidConfigError, QuantizationError


def _linen_params(rng):
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {
        "embed": {"embedding": f(100, 64)},
        "block_0": {
            "norm": {"scale": f(64)},
            "attn": {"query": {"kernel": f(64, 4, 16), "bias": f(4, 16)}, "out": {"kernel": f(4, 16, 64)}},
            "mlp": {"up": {"kernel": f(64, 128)}, "down": {"kernel": f(128, 64), "bias": f(64)}},
        },
        "lm_head": {"kernel": f(64, 100)},
        "tiny": {"kernel": f(4, 4)},
    }


@pytest.mark.parametrize("shape,in_ndim", [((64, 48), 1), ((33, 7), 1), ((16, 4, 8), 1), ((4, 8, 32), 2)])
def test_round_trip_error_is_within_half_a_step(rng, shape, in_ndim):
    w = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    q = quantize_vectorwise(w, in_ndim=in_ndim)
    assert q.qvalue.dtype == jnp.int8 and q.scale.shape == shape[in_ndim:]
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    step = np.asarray(q.scale) / 127
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    # The absmax of every output feature maps exactly to +-127.
    assert q.qvalue.shape == shape[in_ndim:] + shape[:in_ndim]  # stored K-major
    assert np.all(np.abs(np.asarray(q.qvalue)).max(axis=tuple(range(q.qvalue.ndim - in_ndim, q.qvalue.ndim))) == 127)


def test_zero_column_gets_zero_scale_not_nan(rng):
    w = jnp.asarray(rng.standard_normal((32, 8)).astype(np.float32)).at[:, 3].set(0)
    q = quantize_vectorwise(w)
    assert float(q.scale[3]) == 0 and not np.any(np.asarray(q.qvalue[3]))
    assert np.all(np.isfinite(np.asarray(q.dequantize())))


def test_quantize_params_replaces_dense_kernels_only(rng):
    params = _linen_params(rng)
    q = quantize_params(params, Int8Config(min_size=100))
    block = q["block_0"]
    assert isinstance(block["mlp"]["up"]["kernel"], Int8Weight)
    assert isinstance(block["attn"]["query"]["kernel"], Int8Weight) and block["attn"]["query"]["kernel"].in_ndim == 1
    assert isinstance(block["attn"]["out"]["kernel"], Int8Weight) and block["attn"]["out"]["kernel"].in_ndim == 2
    assert q["embed"]["embedding"] is params["embed"]["embedding"]
    assert block["norm"]["scale"] is params["block_0"]["norm"]["scale"]
    assert block["mlp"]["down"]["bias"] is params["block_0"]["mlp"]["down"]["bias"]
    assert not isinstance(q["tiny"]["kernel"], Int8Weight)  # tiny matrices stay float
    assert isinstance(params["lm_head"]["kernel"], jax.Array)  # pure: input unchanged


@pytest.mark.parametrize("pattern", ["lm_head", "glob:lm_*", "re:^lm_h", "lm_*"])
def test_skip_modules_by_name_glob_and_regex(rng, pattern):
    q = quantize_params(_linen_params(rng), Int8Config(min_size=100, skip_modules=(pattern,)))
    assert not isinstance(q["lm_head"]["kernel"], Int8Weight)
    assert isinstance(q["block_0"]["mlp"]["up"]["kernel"], Int8Weight)


def test_skip_modules_by_path_run(rng):
    q = quantize_params(_linen_params(rng), Int8Config(min_size=100, skip_modules=("block_0/mlp",)))
    assert not isinstance(q["block_0"]["mlp"]["up"]["kernel"], Int8Weight)
    assert isinstance(q["block_0"]["attn"]["query"]["kernel"], Int8Weight)


def test_per_layer_capacity_and_in_ndim_overrides(rng):
    cfg = Int8Config(min_size=100, capacity_overrides={"mlp/down": 7}, in_ndim_overrides={"query": 1})
    q = quantize_params(_linen_params(rng), cfg)
    assert q["block_0"]["mlp"]["down"]["kernel"].outlier_capacity == 7
    assert q["block_0"]["mlp"]["up"]["kernel"].outlier_capacity == cfg.outlier_capacity


def test_idempotent_on_quantized_tree(rng):
    cfg = Int8Config(min_size=100)
    once = quantize_params(_linen_params(rng), cfg)
    twice = quantize_params(once, cfg)
    assert jax.tree.structure(once) == jax.tree.structure(twice)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
        assert a is b


def test_dequantize_params_restores_float_kernels(rng):
    params = _linen_params(rng)
    restored = dequantize_params(quantize_params(params, Int8Config(min_size=100)))
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    w, w_hat = params["block_0"]["mlp"]["up"]["kernel"], restored["block_0"]["mlp"]["up"]["kernel"]
    assert w_hat.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(w - w_hat))) <= float(jnp.max(jnp.abs(w))) / 254 * 1.0001


def test_works_under_jit_and_on_frozen_dicts(rng):
    params = _linen_params(rng)
    cfg = Int8Config(min_size=100)
    eager = quantize_params(params, cfg)
    jitted = jax.jit(lambda p: quantize_params(p, cfg))(params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    frozen = quantize_params(freeze(params), cfg)
    assert isinstance(frozen["lm_head"]["kernel"], Int8Weight)


def test_bf16_kernels_quantize(rng):
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _linen_params(rng))
    q = quantize_params(params, Int8Config(min_size=100))
    assert q["lm_head"]["kernel"].scale.dtype == jnp.float32


def test_nnx_state_round_trip(rng):
    model = nnx.Sequential(jint8.Int8Linear(64, 96, rngs=nnx.Rngs(0)), jint8.Int8Linear(96, 32, rngs=nnx.Rngs(1)))
    x = jnp.asarray(rng.standard_normal((5, 64)).astype(np.float32))
    y_float = model(x)
    state = nnx.state(model)
    qstate = quantize_params(state, Int8Config(min_size=100))
    assert isinstance(qstate, nnx.State)
    assert isinstance(qstate["layers"][0]["kernel"].value, Int8Weight)
    assert not isinstance(state["layers"][0]["kernel"].value, Int8Weight)  # input unchanged
    nnx.update(model, qstate)
    y_int8 = model(x)
    assert float(jnp.linalg.norm(y_int8 - y_float) / jnp.linalg.norm(y_float)) < 0.03
    back = dequantize_params(qstate)
    assert back["layers"][1]["kernel"].value.shape == (96, 32)


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda p: p["lm_head"].update(kernel=p["lm_head"]["kernel"].at[3, 4].set(jnp.nan)), "lm_head/kernel.*NaN"),
        (lambda p: p["lm_head"].update(kernel=p["lm_head"]["kernel"].at[0, 0].set(jnp.inf)), "lm_head/kernel.*NaN/Inf"),
        (lambda p: p["lm_head"].update(kernel=jnp.ones((64, 100), jnp.int32)), "lm_head/kernel.*int32"),
        (lambda p: p["lm_head"].update(kernel=jnp.ones((64, 100), bool)), "lm_head/kernel.*bool"),
    ],
)
def test_bad_kernels_raise_naming_the_path(rng, bad, message):
    params = _linen_params(rng)
    bad(params)
    with pytest.raises(QuantizationError, match=message):
        quantize_params(params, Int8Config(min_size=100))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"outlier_capacity": -2}, "outlier_capacity"),
        ({"skip_modules": ("rx:lm_head",)}, "unknown pattern syntax"),
        ({"skip_modules": ("re:(",)}, "invalid regex"),
        ({"skip_modules": ("",)}, "non-empty"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, message):
    with pytest.raises(InvalidConfigError, match=message):
        Int8Config(**kwargs)


def test_non_dense_kernels_are_left_alone():
    conv = nn.Conv(8, (3, 3))
    params = conv.init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))["params"]
    q = quantize_params(params, Int8Config(min_size=0))
    assert not isinstance(q["kernel"], Int8Weight)


def test_per_layer_threshold_overrides(rng):
    cfg = Int8Config(min_size=100, threshold=1.5, threshold_overrides={"down": 6.0})
    q = quantize_params(_linen_params(rng), cfg)
    assert q["block_0"]["mlp"]["down"]["kernel"].threshold == 6.0
    assert q["block_0"]["mlp"]["up"]["kernel"].threshold == 1.5
    with pytest.raises(InvalidConfigError, match="threshold_overrides"):
        Int8Config(threshold_overrides={"down": -1.0})
