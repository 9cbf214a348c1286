"""jint8.ops.int4_matmul against bitsandbytes 0.50's Linear4bit forward on the CPU (same weights)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jint8 import quant4
from jint8.errors import BackendUnavailableError, ShapeError
from jint8.ops import int4_matmul
from jint8.ops.int4_matmul import available_backends, int4_matmul_reference
from reference import require_module

torch = require_module("torch")
bnb = require_module("bitsandbytes")

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16),
          "float16": (torch.float16, jnp.float16)}


def _linear4bit(weight, bias, quant_type, double_quant, compute_dtype):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    layer = layer.to("cpu").eval()  # .to() quantizes the weight
    # The dequantize-then-matmul forward (bitsandbytes' default gemm_4bit); on AVX512-BF16 CPUs it
    # would repack the weight for its fused bf16 kernel instead (see reference.py).
    layer.support_avx512bf16_for_cpu = False
    return layer


def _stored(layer) -> quant4.Int4Weight:
    state = layer.weight.quant_state
    nested = {}
    if state.nested:
        nested = dict(nested_absmax=jnp.asarray(state.state2.absmax.numpy()),
                      nested_code=jnp.asarray(state.state2.code.numpy()), offset=jnp.asarray(state.offset.numpy()))
    return quant4.Int4Weight(packed=jnp.asarray(layer.weight.data.numpy()), absmax=jnp.asarray(state.absmax.numpy()),
                             shape=tuple(state.shape), quant_type=state.quant_type, blocksize=state.blocksize,
                             dtype=jnp.dtype(str(state.dtype).removeprefix("torch.")), **nested)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_int4_matmul_matches_bitsandbytes_linear4bit(rng, dtype_name, quant_type, double_quant):
    torch_dtype, jax_dtype = DTYPES[dtype_name]
    n, k = 48, 192
    weight = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).to(torch_dtype)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(torch_dtype)
    x = torch.from_numpy(rng.standard_normal((3, 5, k)).astype(np.float32)).to(torch_dtype)
    layer = _linear4bit(weight, bias, quant_type, double_quant, torch_dtype)
    with torch.no_grad():
        theirs = layer(x).float().numpy()
    w = _stored(layer)
    x_jax = jnp.asarray(x.float().numpy()).astype(jax_dtype)
    ours = int4_matmul(x_jax, w, jnp.asarray(bias.float().numpy()).astype(jax_dtype))
    assert ours.shape == (3, 5, n) and ours.dtype == jax_dtype
    # Both multiply the same dequantized weight (bit-identical, test_quant4) by the same x; only the
    # summation order of the K products differs (each side's float32 sum is within K u sum|x w| of
    # the exact one, u = 2^-24), plus one rounding of the result to the 16-bit dtype on each side.
    w_dq = np.asarray(w.dequantize(jax_dtype).astype(jnp.float32))
    magnitude = np.abs(np.asarray(x_jax.astype(jnp.float32))) @ np.abs(w_dq).T + np.abs(bias.float().numpy())
    ulp = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype_name]
    bound = 2 * k * 2.0**-24 * magnitude + 2 * ulp * np.abs(theirs)
    assert np.all(np.abs(np.asarray(ours.astype(jnp.float32)) - theirs) <= bound)
    # the op is its reference on the CPU, and a compute dtype is honoured: f32 inputs in bf16
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(int4_matmul_reference(
        x_jax.reshape(15, k), w, jnp.asarray(bias.float().numpy()).astype(jax_dtype), compute_dtype=jax_dtype,
        out_dtype=jax_dtype)).reshape(3, 5, n))
    in_bf16 = int4_matmul(x_jax.astype(jnp.float32), w, dtype=jnp.bfloat16)
    assert in_bf16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(in_bf16), np.asarray(
        int4_matmul(x_jax.astype(jnp.bfloat16), w).astype(jnp.float32)))


def test_functional_matmul_4bit_equals_bitsandbytes_matmul_4bit(rng):
    from jint8 import functional as F

    weight = torch.from_numpy(rng.standard_normal((40, 128)).astype(np.float32))
    x = torch.from_numpy(rng.standard_normal((6, 128)).astype(np.float32))
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    with torch.no_grad():
        theirs = bnb.matmul_4bit(x, packed.t(), state).numpy()  # Linear4bit passes the weight transposed
    w = _stored(_linear4bit(weight, None, "nf4", True, torch.float32))
    ours = np.asarray(F.matmul_4bit(jnp.asarray(x.numpy()), jnp.asarray(packed.numpy()), w))
    # float32 dots of the same dequantized weight (bit-identical): summation order only
    magnitude = np.abs(x.numpy()) @ np.abs(np.asarray(w.dequantize())).T
    assert np.all(np.abs(ours - theirs) <= 2 * 128 * 2.0**-24 * magnitude)


def test_int4_matmul_refuses_bad_input(monkeypatch):
    w = quant4.quantize_4bit(jnp.ones((8, 64), jnp.float32))
    with pytest.raises(ShapeError, match=r"x.shape=\(2, 32\) does not contract with the weight \[N, K\] = \(8, 64\)"):
        int4_matmul(jnp.ones((2, 32)), w)
    with pytest.raises(ShapeError, match=r"bias.shape=\(4,\) must be \(8,\)"):
        int4_matmul(jnp.ones((2, 64)), w, jnp.ones(4))
    with pytest.raises(ShapeError, match="must be an Int4Weight"):
        int4_matmul(jnp.ones((2, 64)), jnp.ones((8, 64)))
    with pytest.raises(BackendUnavailableError, match="backend='pallas_mosaic' is unknown"):
        int4_matmul(jnp.ones((2, 64)), w, backend="pallas_mosaic")
    # JINT8_BACKEND is a preference shared by every op: a kernel that cannot run here (no GPU) or a
    # name this op lacks still runs, on the first backend that fits
    monkeypatch.setenv("JINT8_BACKEND", "pallas_triton")
    assert int4_matmul(jnp.ones((2, 64)), w).shape == (2, 8)
    monkeypatch.setenv("JINT8_BACKEND", "pallas_mosaic")
    assert "xla" in available_backends() and int4_matmul(jnp.ones((2, 64)), w).shape == (2, 8)
