"""jint8.functional and Int8Dense against the real bitsandbytes 0.50 on the CPU.

These must run in CI: `make test` sets JINT8_REQUIRE_REFERENCE=1, so a missing torch or
bitsandbytes fails here instead of skipping.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint8
from jint8 import functional as F
from numerics import EPS
from reference import require_module

torch = require_module("torch")
bnb = require_module("bitsandbytes")

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
JAX_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
SHAPES = [(1, 7, 5), (1, 64, 33), (3, 31, 17), (16, 128, 96), (33, 257, 65)]
PATTERNS = ["none", "single_element", "whole_columns", "zero_row"]


def _activations(m, k, pattern, dtype_name, rng):
    a = rng.standard_normal((m, k)).astype(np.float32) * 2
    if pattern == "single_element":
        a[rng.integers(0, m), rng.integers(0, k)] = 9.5
    elif pattern == "whole_columns":
        cols = rng.choice(k, size=min(3, k), replace=False)
        a[:, cols] *= 25
    elif pattern == "zero_row":
        a[0] = 0
        a[-1, 0] = -7.0
    torch_a = torch.from_numpy(a).to(TORCH_DTYPES[dtype_name])
    # The same values on both sides: round to the dtype in torch, then hand them to jax.
    jax_a = jnp.asarray(torch_a.float().numpy()).astype(JAX_DTYPES[dtype_name])
    return torch_a, jax_a


def _np(t):
    return t.float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype_name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_vectorwise_quant_equals_bitsandbytes(rng, shape, dtype_name, pattern, threshold):
    m, k, _ = shape
    torch_a, jax_a = _activations(m, k, pattern, dtype_name, rng)
    CA, SCA, cols = bnb.functional.int8_vectorwise_quant(torch_a.clone(), threshold)
    ca, sca, our_cols = F.int8_vectorwise_quant(jax_a, threshold)
    np.testing.assert_array_equal(np.asarray(ca), CA.numpy())
    np.testing.assert_array_equal(np.asarray(sca), SCA.numpy())
    if threshold == 0:
        assert cols is None and our_cols is None
    else:
        np.testing.assert_array_equal(np.asarray(our_cols), cols.numpy())
        padded = F.int8_vectorwise_quant(jax_a, threshold, outlier_capacity=k + 2)[2]
        np.testing.assert_array_equal(np.asarray(padded)[: cols.numel()], cols.numpy())
        assert np.all(np.asarray(padded)[cols.numel() :] == -1)


@pytest.mark.parametrize("shape", SHAPES)
def test_int32_accumulator_and_dequant_equal_bitsandbytes(rng, shape):
    m, k, n = shape
    A = rng.integers(-127, 128, (m, k), dtype=np.int8)
    B = rng.integers(-127, 128, (n, k), dtype=np.int8)
    acc = bnb.functional.int8_linear_matmul(torch.from_numpy(A), torch.from_numpy(B))
    ours = F.int8_linear_matmul(jnp.asarray(A), jnp.asarray(B))
    np.testing.assert_array_equal(np.asarray(ours), acc.numpy())
    row, col = rng.uniform(0.1, 5, m).astype(np.float32), rng.uniform(0.01, 1, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    ref = torch.ops.bitsandbytes.int8_mm_dequant(
        acc, torch.from_numpy(row), torch.from_numpy(col), dtype=torch.float32, bias=torch.from_numpy(bias)
    )
    got = F.int8_mm_dequant(ours, jnp.asarray(row), jnp.asarray(col), jnp.float32, jnp.asarray(bias))
    # Same float32 operations in the same order; XLA may contract a multiply-add into an FMA,
    # so allow one float32 rounding of the result.
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=2 * EPS["float32"], atol=1e-30)
    deq = F.int8_vectorwise_dequant(jnp.asarray(A), jnp.asarray(row))
    ref_deq = bnb.functional.int8_vectorwise_dequant(torch.from_numpy(A), torch.from_numpy(row))
    np.testing.assert_allclose(np.asarray(deq), ref_deq.numpy(), rtol=2 * EPS["float32"])


def _mixed_bound(y_int8, y_outlier, dtype_name):
    """bitsandbytes rounds the int8 part to the dtype, then adds the outlier part in the dtype (two
    roundings, each <= eps * magnitude); jint8 rounds the float32 sum once; the outlier matmul in
    16 bits may round products' partial sums: allow eps on each part and the sum, three times."""
    eps = EPS[dtype_name]
    return 3 * eps * (np.abs(y_int8) + np.abs(y_outlier)) + 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_mixed_scaled_mm_matches_bitsandbytes(rng, shape, dtype_name):
    m, k, n = shape
    torch_a, jax_a = _activations(m, k, "whole_columns", dtype_name, rng)
    W = torch.from_numpy((rng.standard_normal((n, k)) * 0.1).astype(np.float32)).to(torch.float16)
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W.clone())
    CA, SCA, cols = bnb.functional.int8_vectorwise_quant(torch_a.clone(), 6.0)
    bias = torch.randn(n, dtype=TORCH_DTYPES[dtype_name])
    ref_out, ref_sub = torch.ops.bitsandbytes.int8_mixed_scaled_mm(torch_a, CA, CB, SCA, SCB, cols, bias)
    ca, sca, our_cols = jax.jit(lambda a: F.int8_vectorwise_quant(a, 6.0))(jax_a)  # static K slots
    out, sub = F.int8_mixed_scaled_mm(
        jax_a, ca, jnp.asarray(CB.numpy()), sca, jnp.asarray(SCB.numpy()), our_cols, jnp.asarray(_np(bias)).astype(jax_a.dtype)
    )
    assert out.dtype == jax_a.dtype and our_cols.shape == (k,)
    np.testing.assert_array_equal(np.asarray(sub.astype(jnp.float32))[:, : cols.numel()], _np(ref_sub))
    y_int8 = _np(torch.ops.bitsandbytes.int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=torch.float32))
    y_outlier = _np(ref_out) - y_int8
    err = np.abs(np.asarray(out.astype(jnp.float32)) - _np(ref_out))
    assert np.all(err <= _mixed_bound(y_int8, y_outlier, dtype_name))


@pytest.mark.parametrize("shape", [(1, 64, 48), (5, 33, 17), (16, 256, 130)])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_dense_matches_linear8bitlt(rng, shape, threshold):
    m, k, n = shape
    w = torch.from_numpy((rng.standard_normal((n, k)) * 0.1).astype(np.float32)).to(torch.float16)
    b = torch.randn(n, dtype=torch.float16)
    layer = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    layer = layer.to("cpu").eval()  # eval: bitsandbytes' CPU training path skips LLM.int8()
    torch_a, jax_a = _activations(m, k, "whole_columns", "float16", rng)
    with torch.no_grad():
        ref = layer(torch_a)

    params = {"kernel": jnp.asarray(w.float().numpy().T).astype(jnp.float16), "bias": jnp.asarray(b.float().numpy()).astype(jnp.float16)}
    qparams = jint8.quantize_params(params, jint8.Int8Config(threshold=threshold, min_size=0))
    # Same int8 weights and scales as bitsandbytes (which quantizes W.to(float16) row-wise).
    np.testing.assert_array_equal(np.asarray(qparams["kernel"].qvalue), layer.state.CB.numpy())
    np.testing.assert_array_equal(np.asarray(qparams["kernel"].scale), layer.state.SCB.numpy())
    ours = jint8.Int8Dense(n, dtype=jnp.float16).apply({"params": qparams}, jax_a)

    CA, SCA, _ = bnb.functional.int8_vectorwise_quant(torch_a.clone(), threshold)
    y_int8 = _np(torch.ops.bitsandbytes.int8_scaled_mm(CA, layer.state.CB, SCA, layer.state.SCB, bias=b, dtype=torch.float32))
    err = np.abs(np.asarray(ours.astype(jnp.float32)) - _np(ref))
    assert np.all(err <= _mixed_bound(y_int8, _np(ref) - y_int8, "float16"))


def test_outlier_capacity_overflow_is_an_error_eagerly():
    a = jnp.zeros((2, 16)).at[0, jnp.arange(5)].set(10.0)
    with pytest.raises(jint8.errors.InvalidConfigError, match="outlier_capacity=3"):
        F.int8_vectorwise_quant(a, 6.0, outlier_capacity=3)


def test_int8_config_from_bitsandbytes_config():
    transformers = require_module("transformers")
    bnb_config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0, llm_int8_skip_modules=["out_proj"])
    cfg = jint8.Int8Config.from_bitsandbytes(bnb_config)
    assert cfg.threshold == 5.0 and cfg.skip_modules == ("out_proj",) and cfg.min_size == 0
    assert jint8.Int8Config.from_bitsandbytes(bnb_config.to_dict()) == cfg
    assert jint8.Int8Config.from_bitsandbytes({"load_in_8bit": True}).skip_modules == ("lm_head",)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"load_in_4bit": True}, "4-bit"),
        ({"load_in_8bit": True, "llm_int8_enable_fp32_cpu_offload": True}, "cpu_offload"),
        ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "has_fp16_weight"),
        ({"load_in_8bit": True, "quant_method": "gptq"}, "quant_method"),
        ({"load_in_8bit": False}, "load_in_8bit"),
    ],
)
def test_int8_config_from_bitsandbytes_rejects_unsupported_options(options, message):
    with pytest.raises(jint8.errors.InvalidConfigError, match=message):
        jint8.Int8Config.from_bitsandbytes(options)
