"""Loading converts on the device: layout, cast and int8 quantization equal the host recipe bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import PartitionSpec as P
from reference import require_module
from tiny_checkpoints import torch_model

import jint8
from jint8.loading.device_convert import compiled_conversion, plan_conversion, stage
from jint8.quantize import leaf_quantization

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _kernel_with_ties(rng, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] weights, rows along the scale axis: random rows, plus rows whose x * 127 / s
    land exactly on k + 0.5 (s = 127 and s = 254: round half to even decides), and a zero row."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[0, :4] = [127.0, 2.5, -3.5, 0.5]
    w[1, :4] = [254.0, 1.0, 3.0, -5.0]
    w[2] = 0.0
    return w


# (name, the stored array's shape, transposed to Flax, the Flax path, Int8Config)
LAYOUTS = [
    ("pytorch_linear", (48, 80), True, ("model", "layers_0", "mlp", "up_proj", "kernel"), jint8.Int8Config()),
    ("flax_kernel", (80, 48), False, ("model", "layers_0", "mlp", "up_proj", "kernel"), jint8.Int8Config()),
    ("kernel_in_ndim_1", (64, 4, 8), False, ("attn", "query", "kernel"), jint8.Int8Config()),
    ("kernel_in_ndim_2", (4, 8, 64), False, ("attn", "out", "kernel"), jint8.Int8Config()),
    ("embedding", (96, 40), False, ("model", "embed_tokens", "embedding"), jint8.Int8Config(quantize_embeddings=True)),
]


def _stored(rng, shape, dtype) -> np.ndarray:
    if len(shape) == 2:
        w = _kernel_with_ties(rng, *shape)
    else:
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
    stored = w.astype(dtype)
    stored.flags.writeable = False  # like the memory-mapped views the safetensors reader returns
    return stored


def _convert(stored, transpose, decision, out_dtype=jnp.bfloat16):
    conversion = plan_conversion(stored.shape, stored.dtype, transpose=transpose, quantization=decision,
                                 out_dtype=out_dtype, float_spec=P(), mesh=None)
    return conversion, compiled_conversion(conversion)(stage(stored, conversion))


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, transpose, path, config", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_device_quantization_equals_the_host_recipe(dtype, name, shape, transpose, path, config):
    stored = _stored(np.random.default_rng(0), shape, DTYPES[dtype])
    flax_layout = stored.T if transpose else stored
    # the host recipe as the loader ran it before: quantize_params on the host CPU, one leaf
    with jax.default_device(jax.devices("cpu")[0]):
        tree = unflatten_dict({path: jnp.asarray(np.ascontiguousarray(flax_layout))})
        expected = flatten_dict(jint8.quantize_params(tree, config),
                                is_leaf=lambda _, x: isinstance(x, jint8.Int8Weight))[path]
    assert isinstance(expected, jint8.Int8Weight)
    decision = leaf_quantization(path, flax_layout.shape, config)
    _, (qvalue, scale, nonfinite) = _convert(stored, transpose, decision)
    assert qvalue.dtype == jnp.int8 and qvalue.shape == expected.qvalue.shape
    np.testing.assert_array_equal(np.asarray(qvalue), np.asarray(expected.qvalue))
    np.testing.assert_array_equal(_bits(scale), _bits(expected.scale))
    assert (decision.in_ndim, decision.threshold, decision.outlier_capacity) == (
        expected.in_ndim, expected.threshold, expected.outlier_capacity)
    assert not bool(nonfinite)


@pytest.mark.parametrize("dtype", DTYPES)
def test_device_quantization_matches_bitsandbytes_recipe_in_numpy(dtype):
    """The same numbers from the recipe written out in numpy as torch evaluates it: s = max |W|,
    127 / s as reciprocal then * 127 in float32, round half to even (bitsandbytes' int8_vectorwise_quant)."""
    stored = _stored(np.random.default_rng(1), (40, 72), DTYPES[dtype])  # a torch Linear weight [out, in]
    path = ("model", "layers_0", "self_attn", "q_proj", "kernel")
    decision = leaf_quantization(path, stored.shape[::-1], jint8.Int8Config())
    _, (qvalue, scale, _) = _convert(stored, True, decision)
    w = stored.astype(np.float32)
    s = np.max(np.abs(w), axis=1)
    multiplier = np.where(s > 0, (np.float32(1) / np.where(s > 0, s, 1)).astype(np.float32) * np.float32(127), 0)
    expected = np.rint(w * multiplier.astype(np.float32)[:, None]).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(scale), s)
    np.testing.assert_array_equal(np.asarray(qvalue), expected)
    assert np.asarray(qvalue)[0, 1] == 2 and np.asarray(qvalue)[1, 2] == 2  # 2.5 and 1.5 to even


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_flagged(bad):
    stored = _stored(np.random.default_rng(2), (48, 80), ml_dtypes.bfloat16).copy()
    stored[17, 33] = bad
    path = ("model", "layers_0", "mlp", "up_proj", "kernel")
    _, (_, _, nonfinite) = _convert(stored, True, leaf_quantization(path, (80, 48), jint8.Int8Config()))
    assert bool(nonfinite)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [True, False])
def test_device_cast_and_transpose_equal_the_host_cast(dtype, out_dtype, transpose):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    w[0, :6] = [1e-30, -3e-39, 65504.0, 1.00390625, 1.0 + 2**-9, 1e-6]  # tiny, subnormal, ties
    stored = w.astype(DTYPES[dtype])
    conversion, (placed, nonfinite) = _convert(stored, transpose, None, out_dtype)
    assert not bool(nonfinite)  # float leaves carry the NaN/Inf flag too
    with np.errstate(over="ignore"):  # bfloat16 65504 rounds to 65536: inf in float16, on both paths
        host = np.asarray(stored.T if transpose else stored).astype(jnp.dtype(out_dtype))  # the old host path
    assert placed.dtype == out_dtype and placed.shape == host.shape
    np.testing.assert_array_equal(_bits(placed), _bits(host))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order, shape, quantized", [
    (("rotary", 4), (64, 40), False), (("rotary", 4), (64, 40), True), (("rotary", 2), (32, 40), True),
    (("bloom_qkv", 4), (96, 32), False), (("bloom_qkv", 4), (96, 32), True), (("bloom_qkv", 4), (96,), False)])
def test_gguf_row_order_on_the_device_equals_the_host_permutation(dtype, order, shape, quantized):
    """A GGUF attn_q / attn_k (rotary pairs) or BLOOM attn_qkv (q | k | v, weight and bias)
    permuted in the jitted conversion gives the parameter the host copy permuted by
    gguf_file's numpy functions gives (the previous path), bit for bit."""
    from jint8.loading.gguf_file import RowOrder, bloom_qkv_from_llama_cpp, reverse_rotary_permutation

    stored = _stored(np.random.default_rng(4), shape, DTYPES[dtype])
    kind, heads = order
    host_order = reverse_rotary_permutation if kind == "rotary" else bloom_qkv_from_llama_cpp
    permuted = np.ascontiguousarray(host_order(stored, heads))
    assert not np.array_equal(permuted, stored)  # the order matters for these shapes
    path = ("model", "layers_0", "self_attn", "q_proj", "kernel" if len(shape) == 2 else "bias")
    decision = leaf_quantization(path, shape[::-1], jint8.Int8Config()) if quantized else None
    transpose = len(shape) == 2
    expected = _convert(permuted, transpose, decision)[1]
    conversion = plan_conversion(stored.shape, stored.dtype, transpose=transpose, quantization=decision,
                                 out_dtype=jnp.bfloat16, float_spec=P(), mesh=None, row_order=RowOrder(kind, heads))
    got = compiled_conversion(conversion)(stage(stored, conversion))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_each_conversion_compiles_once(tmp_path):
    require_module("torch")
    torch_model("llama").save_pretrained(tmp_path, safe_serialization=True)
    compiled_conversion.cache_clear()
    _, params = jint8.from_pretrained(tmp_path, quantization=jint8.Int8Config(), progress=False)
    compiles = compiled_conversion.cache_info().misses
    tensors = len(jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jint8.Int8Weight)))
    assert 0 < compiles < tensors / 2, (compiles, tensors)  # the layers share their conversions
    jint8.from_pretrained(tmp_path, quantization=jint8.Int8Config(), progress=False)
    assert compiled_conversion.cache_info().misses == compiles  # a second load compiles nothing


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_int8_load_equals_quantize_params_of_the_float_load(tmp_path, dtype):
    """Through from_pretrained: transposes, casts and quantization of every tensor of a checkpoint
    saved in `dtype` give quantize_params' tree of the same checkpoint loaded in float32."""
    torch = require_module("torch")
    torch_model("llama").to(getattr(torch, dtype)).save_pretrained(tmp_path, safe_serialization=True)
    config = jint8.Int8Config(quantize_embeddings=True, skip_modules=("lm_head",))
    _, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, quantization=config, progress=False)
    _, float_params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    with jax.default_device(jax.devices("cpu")[0]):
        expected = jint8.quantize_params(float_params, config)
    assert isinstance(params["model"]["embed_tokens"]["embedding"], jint8.Int8Weight)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
