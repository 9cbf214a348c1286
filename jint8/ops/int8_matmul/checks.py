"""Float64 evaluation of the LLM.int8() recipe and the error bound kernels are held to.

Shared by tests/ops/ (interpret mode, CPU) and tools/gpu_check.py.

The bound, per output element, against the recipe evaluated in float64 on the same quantized
inputs (xq, s_x are exact: the tests check them bit for bit):
  |y - y64| <= u_out * |y64| + (C + S + 8) * 2^-24 * T     (C: stream_terms, the float32 terms
                                                            the outlier dot sums per element)
where T = sum_k |xq[:, k] * wq[k, :]| * s_x * s_w / 127^2 + |bias| + sum_c |x[:, c] * w_deq[c, :]|
is the sum of the magnitudes of every term, and
- u_out is half an ulp of the output dtype relative to the value (2^-8 bf16, 2^-11 f16, 2^-24 f32):
  the one final cast;
- float32 work before it: acc -> f32 (acc < 127^2 K may exceed 2^24), two scale products,
  the bias add, the stream add (5 roundings), split-K's S-term partial sum (S), and the
  outlier stream's C-term float32 dot in some order ((C - 1) roundings); each rounding costs at
  most 2^-24 of the magnitudes it touches, so (C + S + 8) * 2^-24 * T covers them with room.
  T's int8 term is the sum of the products' magnitudes, not |acc|: a split-K plan scales and
  rounds each split's partial accumulator, and partials of opposite signs can each be far
  larger than their sum (seen: partials of 10.4, -11.8 and 1.3 for a total of 0.023).
w_deq (the dequantized outlier weight rows in x.dtype) is formed identically by the reference
and the GEMM kernel (float32 products, one cast), so for them it carries no error term. The fused
skinny kernel (pallas_triton.fused) never rounds the weight to x.dtype: it sums x * wq exactly
formed in float32 and scales by s_w / 127 at the end. Against y64 (built on the rounded w_deq) it
differs by at most half an ulp of x.dtype per weight, relative: `weight_rounding` =
u_x * sum_c |x[:, c] * w_deq[c, :]| (u_x: half an ulp of x.dtype, see stream_magnitude), added
to the bound for that kernel only.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from jint8.ops.int8_matmul import reference

_HALF_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def float64_recipe(x, wq, col_scales, bias, *, threshold: float):
    """(y64 [M, N] float64, T [M, N] magnitude sum) of the recipe on x's exact quantization."""
    xq, row_scales, col_mask = (np.asarray(a) for a in reference.quantize_rows(x, threshold))
    # int8 products summed in float64 are exact while |acc| < 2^53 (127^2 K is far below).
    xq, wq64 = xq.astype(np.float64), np.asarray(wq).astype(np.float64)
    scale = np.asarray(row_scales, np.float64)[:, None] * np.asarray(col_scales, np.float64)[None]
    scale = scale * float(np.float32(reference.INV_127_SQ))
    y = (xq @ wq64) * scale
    magnitude = (np.abs(xq) @ np.abs(wq64)) * scale  # bounds every split's partial (docstring)
    if bias is not None:
        b = np.asarray(jnp.asarray(bias, jnp.float32), np.float64)[None, :]
        y += b
        magnitude += np.abs(b)
    if threshold > 0 and col_mask.any():
        cols = np.flatnonzero(col_mask)
        w_deq = reference.dequantize_weight_rows(jnp.asarray(wq)[cols], col_scales, x.dtype)
        w_deq = np.asarray(w_deq.astype(jnp.float32), np.float64)
        x_o = np.asarray(jnp.asarray(x)[:, cols].astype(jnp.float32), np.float64)
        y += x_o @ w_deq
        magnitude += np.abs(x_o) @ np.abs(w_deq)
    return y, magnitude


def weight_rounding(x, wq, col_scales, *, threshold: float):
    """[M, N] float64: u_x * sum_c |x[:, c] * w_deq[c, :]| over the outlier columns c, the
    rounding of w_deq to x.dtype that the fused kernel skips (module docstring); wq is [K, N]."""
    _, _, col_mask = reference.quantize_rows(x, threshold)
    col_mask = np.asarray(col_mask)
    m, n = x.shape[0], np.asarray(col_scales).shape[0]
    if threshold <= 0 or not col_mask.any():
        return np.zeros((m, n))
    cols = np.flatnonzero(col_mask)
    w_deq = reference.dequantize_weight_rows(jnp.asarray(wq)[cols], col_scales, x.dtype)
    w_deq = np.asarray(w_deq.astype(jnp.float32), np.float64)
    x_o = np.asarray(jnp.asarray(x)[:, cols].astype(jnp.float32), np.float64)
    return _HALF_ULP[jnp.dtype(x.dtype).name] * (np.abs(x_o) @ np.abs(w_deq))


def output_error_bound(y64, magnitude, out_dtype, *, stream_terms: int, split_k: int = 1,
                       weight_rounding=0.0):
    """Elementwise bound on |y - y64| (module docstring)."""
    u_out = _HALF_ULP[jnp.dtype(out_dtype).name]
    return (u_out * np.abs(y64) + (stream_terms + split_k + 8) * 2.0**-24 * magnitude
            + weight_rounding)


def max_bound_violation(y, y64, magnitude, out_dtype, *, stream_terms: int, split_k: int = 1,
                        weight_rounding=0.0):
    """max(|y - y64| / bound) over elements (<= 1 passes); inf if any element is not finite."""
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    if not np.all(np.isfinite(y)):
        return float("inf")
    bound = output_error_bound(y64, magnitude, out_dtype, stream_terms=stream_terms,
                               split_k=split_k, weight_rounding=weight_rounding)
    return float(np.max(np.abs(y - y64) / np.maximum(bound, 1e-30), initial=0.0))


def exact_norm_inputs(rng, m: int, k: int, n: int, dtype, *, eps: float = 1e-5):
    """(x [M, K], RMSNorm scale [K], wq [N, K]) for exact checks of a folded InputNorm(scale, eps).

    x sits on a quarter-integer grid and scale on an eighth-integer grid, so every square and
    every partial sum of squares is exact in float32: the sum has the same bits in any summation
    order. 1/rms is not: jit-compiled XLA turns sum / K into sum * (1 / K) (op by op it divides),
    which moved 1/rms by 2 ulps on a seed CI drew, and a GPU's rsqrt may be approximate. So a
    row is redrawn until 1/rms off by up to 4 ulps either way leaves every bit of its normalised
    x unchanged (Llama's and Gemma's roundings): then a kernel's normalised x must equal
    reference.rms_norm's bit for bit. Three columns hold 40 with scale 4, so |norm(x)| >= 40 / rms * 4 > 6 there: outliers exist.
    """
    scale = rng.integers(1, 40, k) * 0.125
    outliers = rng.choice(k, 3, replace=False)
    scale[outliers] = 4.0
    x = np.empty((m, k))
    for row in range(m):
        for _ in range(1000):
            x[row] = rng.integers(-8, 9, k) * 0.25
            x[row, outliers] = 40.0
            if _norm_bits_stable(x[row], scale, eps, dtype):
                break
        else:
            raise RuntimeError(f"exact_norm_inputs: no stable row in 1000 draws (K={k})")
    wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    return jnp.asarray(x, dtype), jnp.asarray(scale, dtype), wq


def _norm_bits_stable(x_row, scale, eps: float, dtype) -> bool:
    """Whether both rms_norm roundings of this row keep their bits for 1/rms within 4 ulps."""
    dtype = jnp.dtype(dtype)
    xf, scale32 = x_row.astype(np.float32), scale.astype(np.float32)
    mean = np.float32(np.sum(xf * xf, dtype=np.float32) / np.float32(x_row.shape[0]))
    inverse_rms = np.float32(1.0 / np.sqrt(np.float64(mean + np.float32(eps))))
    ulp = np.spacing(inverse_rms)
    outputs = set()
    for step in range(-4, 5):
        normed = xf * np.float32(inverse_rms + step * ulp)
        llama = (scale32 * normed.astype(dtype).astype(np.float32)).astype(dtype)
        gemma = (normed * (np.float32(1.0) + scale32)).astype(dtype)
        outputs.add((llama.tobytes(), gemma.tobytes()))
    return len(outputs) == 1


def exact_gate_inputs(rng, m: int, k: int, n: int, dtype, *, outliers: bool = True):
    """(x [M, 2K] = gate | up, wq [N, K]) for exact checks of a folded silu InputGate.

    Every gate is 0, an integer in [20, 48] or one in [-200, -104]: there any float32 silu is
    exact, whatever its exp and division (sigmoid rounds to 1, or exp overflows and it is 0), so
    silu(gate) is 0, gate or -0 on every backend. up is a multiple of 1/256 with |up| <= 30/256,
    so act * up is exact in float32 and rounded once to dtype: a kernel's op input must equal
    reference.InputGate's bit for bit. |act * up| <= 5.7 < 6; with `outliers`, three columns
    hold gate 32 and up 0.5 (16 in every row), so outlier columns exist.
    """
    kind = rng.integers(0, 3, (m, k))
    gate = np.where(kind == 0, 0, np.where(kind == 1, rng.integers(20, 49, (m, k)),
                                            -rng.integers(104, 201, (m, k))))
    up = rng.integers(-30, 31, (m, k)) / 256
    if outliers:
        columns = rng.choice(k, 3, replace=False)
        gate[:, columns], up[:, columns] = 32, 0.5
    wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    return jnp.asarray(np.concatenate([gate, up], axis=1), dtype), wq
