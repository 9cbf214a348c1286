"""The XLA reference int8_matmul against independent numpy statements of the recipe."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jint8 import quantize_vectorwise
from jint8.errors import BackendUnavailableError, InvalidConfigError, ShapeError
from jint8.ops import int8_matmul
from jint8.ops.int8_matmul import InputGate, int8_dot, quantize_rows, select_backend
from numerics import float64_matmul, int8_error_bound, numpy_quantize_rows
from reference import require_module

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _inputs(rng, m, k, n, dtype_name, outlier_cols=(), magnitude=40.0):
    x = rng.standard_normal((m, k)).astype(np.float32)
    for c in outlier_cols:
        x[rng.integers(0, m), c] = magnitude * rng.choice([-1, 1])
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = jnp.asarray(x, DTYPES[dtype_name])
    return x, jnp.asarray(w)


@pytest.mark.parametrize("m,k", [(1, 7), (5, 33), (64, 130)])
@pytest.mark.parametrize("threshold", [0.0, 2.0, 6.0])
def test_quantize_rows_equals_numpy_recipe(rng, m, k, threshold):
    x = rng.standard_normal((m, k)).astype(np.float32) * 3
    x[0, :] = 0  # an all-zero row quantizes to zeros, never NaN
    xq, scales, mask = quantize_rows(jnp.asarray(x), threshold)
    xq_np, scales_np, mask_np = numpy_quantize_rows(x, threshold)
    np.testing.assert_array_equal(np.asarray(xq), xq_np)
    np.testing.assert_array_equal(np.asarray(scales), scales_np)
    np.testing.assert_array_equal(np.asarray(mask), mask_np)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 255, 17), (33, 1031, 5)])
def test_int32_accumulator_is_exact(rng, m, k, n):
    a = rng.integers(-127, 128, (m, k), dtype=np.int8)
    b = rng.integers(-127, 128, (k, n), dtype=np.int8)
    expected = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(int8_dot(jnp.asarray(a), jnp.asarray(b))), expected)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("m,k,n,cols", [(1, 64, 48, (3,)), (16, 257, 129, (0, 5, 200)), (40, 96, 31, ())])
def test_output_within_derived_bound_of_float64(rng, dtype_name, m, k, n, cols):
    x, w = _inputs(rng, m, k, n, dtype_name, cols)
    bias = jnp.asarray(rng.standard_normal(n).astype(np.float32))
    q = quantize_vectorwise(w)
    y = int8_matmul(x, q.qvalue, q.scale, bias, threshold=6.0, outlier_capacity=8, weight_layout="nk")
    assert y.dtype == x.dtype and y.shape == (m, n)
    y_ref = float64_matmul(np.asarray(x.astype(jnp.float32)), np.asarray(w), np.asarray(bias))
    bound = int8_error_bound(np.asarray(x.astype(jnp.float32)), np.asarray(w), 6.0, dtype_name, y_ref)
    err = np.abs(np.asarray(y.astype(jnp.float32), np.float64) - y_ref)
    assert np.all(err <= bound), f"max excess {(err - bound).max()}"


def test_outlier_decomposition_cuts_error_at_least_5x(rng):
    x, w = _inputs(rng, 64, 4096, 256, "bfloat16", ())  # DESIGN.md anchor setup
    x = x.at[:, jnp.array([7, 100, 300, 301, 1450, 2500, 2, 4000])].multiply(40.0)  # whole columns ×40
    q = quantize_vectorwise(w)
    y_ref = float64_matmul(np.asarray(x.astype(jnp.float32)), np.asarray(w))

    def rel_error(threshold):
        y = int8_matmul(x, q.qvalue.T, q.scale, threshold=threshold, outlier_capacity=16)
        return np.linalg.norm(np.asarray(y.astype(jnp.float32)) - y_ref) / np.linalg.norm(y_ref)

    with_decomposition, without = rel_error(6.0), rel_error(0.0)
    assert with_decomposition * 5 <= without, (with_decomposition, without)
    assert with_decomposition < 0.02


def test_capacity_overflow_is_exact_and_reported(rng):
    x, w = _inputs(rng, 8, 64, 32, "float32", (1, 9, 17, 33, 60))
    q = quantize_vectorwise(w)
    roomy, roomy_stats = int8_matmul(x, q.qvalue, q.scale, outlier_capacity=8, weight_layout="nk", return_stats=True)
    step = jax.jit(lambda x: int8_matmul(x, q.qvalue.T, q.scale, outlier_capacity=2, return_stats=True))
    tight, tight_stats = step(x)
    np.testing.assert_allclose(np.asarray(tight), np.asarray(roomy), rtol=1e-5, atol=1e-5)
    assert int(roomy_stats.num_outlier_columns) == int(tight_stats.num_outlier_columns) == 5
    assert not bool(roomy_stats.capacity_overflow) and bool(tight_stats.capacity_overflow)
    # reported through the stats only: a host callback in the program (a log call from inside
    # it) would make every XLA:CPU dispatch of a program holding the op wait for its whole run
    lowered = step.lower(x).as_text()
    assert "callback" not in lowered.lower()


def test_threshold_zero_matches_plain_int8_path(rng):
    x, w = _inputs(rng, 4, 40, 24, "float32", (3,))
    q = quantize_vectorwise(w)
    y, stats = int8_matmul(x, q.qvalue.T, q.scale, threshold=0.0, return_stats=True)
    xq, s_x, _ = numpy_quantize_rows(np.asarray(x), 0.0)
    acc = xq.astype(np.int64) @ np.asarray(q.qvalue, np.int64).T
    expected = acc.astype(np.float32) * (s_x[:, None] * np.asarray(q.scale)[None, :]) * np.float32(6.200124e-05)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=1e-6)
    assert int(stats.num_outlier_columns) == 0


def test_batched_leading_dims_and_jit(rng):
    x, w = _inputs(rng, 6, 32, 16, "float32", (2,))
    q = quantize_vectorwise(w)
    x3 = x.reshape(2, 3, 32)
    eager = int8_matmul(x3, q.qvalue.T, q.scale)
    jitted = jax.jit(lambda x: int8_matmul(x, q.qvalue.T, q.scale))(x3)
    assert eager.shape == (2, 3, 16)
    # jit may fuse the float epilogue differently (reassociation): equal to float32 rounding
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-6, atol=1e-6)
    flat = int8_matmul(x, q.qvalue.T, q.scale)
    np.testing.assert_allclose(np.asarray(eager).reshape(6, 16), np.asarray(flat), rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 70),
    n=st.integers(1, 40),
    dtype_name=st.sampled_from(sorted(DTYPES)),
    num_outliers=st.integers(0, 5),
    capacity=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes_dtypes_outlier_patterns(m, k, n, dtype_name, num_outliers, capacity, seed):
    rng = np.random.default_rng(seed)
    cols = rng.choice(k, size=min(num_outliers, k), replace=False)
    x, w = _inputs(rng, m, k, n, dtype_name, cols, magnitude=float(rng.uniform(6, 100)))
    q = quantize_vectorwise(w)
    # jitted, as models call it: one compilation per drawn shape, where the eager call compiles
    # each of the recipe's ops for it (most of this test's time); the bound is the recipe's either way
    matmul = jax.jit(functools.partial(int8_matmul, outlier_capacity=capacity, return_stats=True))
    y, stats = matmul(x, q.qvalue.T, q.scale)
    xf = np.asarray(x.astype(jnp.float32))
    y_ref = float64_matmul(xf, np.asarray(w))
    bound = int8_error_bound(xf, np.asarray(w), 6.0, dtype_name, y_ref)
    assert np.all(np.abs(np.asarray(y.astype(jnp.float32), np.float64) - y_ref) <= bound)
    count = int((np.abs(xf) >= 6.0).any(axis=0).sum())
    assert int(stats.num_outlier_columns) == count
    assert bool(stats.capacity_overflow) == (count > min(capacity, k))


def test_bad_inputs_name_the_parameter():
    x = jnp.ones((2, 8))
    wq = jnp.ones((8, 4), jnp.int8)
    s = jnp.ones(4)
    with pytest.raises(ShapeError, match="wq must be 2-D"):
        int8_matmul(x, wq.reshape(2, 4, 4), s)
    with pytest.raises(ShapeError, match="wq must be int8"):
        int8_matmul(x, wq.astype(jnp.int32), s)
    with pytest.raises(ShapeError, match="does not contract"):
        int8_matmul(jnp.ones((2, 7)), wq, s)
    with pytest.raises(ShapeError, match="col_scales"):
        int8_matmul(x, wq, jnp.ones(5))
    with pytest.raises(ShapeError, match="x must be floating"):
        int8_matmul(x.astype(jnp.int32), wq, s)
    with pytest.raises(InvalidConfigError, match="threshold"):
        int8_matmul(x, wq, s, threshold=-1.0)
    with pytest.raises(BackendUnavailableError, match="unknown"):
        int8_matmul(x, wq, s, backend="cuda_magic")


def test_backend_env_switch_forces_xla(monkeypatch):
    monkeypatch.setenv("JINT8_BACKEND", "xla")
    assert select_backend(jnp.ones((2, 8)), jnp.ones((8, 4), jnp.int8)).name == "xla"
    monkeypatch.setenv("JINT8_BACKEND", "nonexistent")
    with pytest.raises(BackendUnavailableError, match="nonexistent"):
        select_backend(jnp.ones((2, 8)), jnp.ones((8, 4), jnp.int8))


def test_default_backend_on_cpu_is_xla():
    assert select_backend(jnp.ones((2, 8)), jnp.ones((8, 4), jnp.int8)).name == "xla"


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_input_gate_rounds_like_transformers_silu_times_up(rng, dtype_name):
    """InputGate("silu") on gate | up rounds as transformers' LlamaMLP in torch: silu in float32
    rounded to the dtype, then the rounded product. Their float32 silu differ in the last bit
    (torch divides by 1 + exp(-x), jax multiplies by its reciprocal); wherever the two round to
    the same dtype value, the results are equal bit for bit."""
    torch = require_module("torch")
    dtype = DTYPES[dtype_name]
    gate, up = rng.standard_normal((2, 16, 512)) * np.array([4.0, 1.0])[:, None, None]
    x = jnp.asarray(np.concatenate([gate, up], axis=1), dtype)
    got = np.asarray(InputGate("silu")(x).astype(jnp.float32))
    t = torch.tensor(np.asarray(x.astype(jnp.float32))).to(getattr(torch, dtype_name))
    t_gate, t_up = t[:, :512], t[:, 512:]
    want = (torch.nn.functional.silu(t_gate) * t_up).float().numpy()
    torch_silu = torch.nn.functional.silu(t_gate.float()).numpy()
    jax_silu = np.asarray(jax.nn.silu(x[:, :512].astype(jnp.float32)))
    same_silu = np.asarray(jnp.asarray(torch_silu).astype(dtype) == jnp.asarray(jax_silu).astype(dtype))
    assert same_silu.mean() > 0.99
    np.testing.assert_array_equal(got[same_silu], want[same_silu])


def test_prologue_concepts_keep_their_older_addresses():
    """InputNorm, InputGate, OutputGate and op_input live in ops.int8_matmul.prologue; the op's
    package and reference.py still hand out the same objects (callers import them from both)."""
    from jint8.ops.int8_matmul import prologue, reference

    for name in ("InputNorm", "InputGate", "OutputGate"):
        assert getattr(int8_matmul, name) is getattr(prologue, name) is getattr(reference, name)
    assert reference.op_input is prologue.op_input
    x = jnp.arange(8.0).reshape(2, 4)
    np.testing.assert_array_equal(prologue.op_input(x, gate=InputGate("silu")),
                                  jax.nn.silu(x[:, :2]) * x[:, 2:], strict=True)
