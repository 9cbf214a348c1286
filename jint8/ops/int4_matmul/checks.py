"""What a 4-bit matmul kernel is held to (tests in interpret mode, benchmarks' GPU check).

1. Its dequantized weight equals reference.dequantized_weight(w, compute_dtype) bit for bit.
2. Its output y is within output_error_bound of y64, the recipe in float64 on those same weights:
     y64 = x_c @ w_c.T + bias_c      (x_c, w_c, bias_c: x, the weight and the bias in the compute
                                      dtype, every product exact in float64)
   The kernel sums the K products and the bias (K + 1 float32 terms) in some order: a dot, the
   MMA's K chunks, split-K partials, any tree. Any order of n terms is within (n - 1) u T of the
   exact sum, u = 2^-24, T = |x_c| @ |w_c|.T + |bias_c|; tensor cores may round their float32
   additions toward zero (an error up to 2u each), hence 2 (K + 2) u T. The one rounding to the
   compute dtype adds u_c |y| <= u_c (|y64| + that), u_c its unit roundoff (2^-8 bf16, 2^-11 f16,
   0 for float32 output of a float32 compute dtype), and a cast to a narrower out_dtype one more.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

UNIT_ROUNDOFF = {jnp.dtype(jnp.float32): 2.0**-24, jnp.dtype(jnp.bfloat16): 2.0**-8, jnp.dtype(jnp.float16): 2.0**-11}


def float64_recipe(x, weight, bias, compute_dtype):
    """(y64 [M, N], T [M, N]) for x [M, K], weight [N, K] already in compute_dtype (the reference's
    dequantized_weight), bias [N] or None."""
    dtype = jnp.dtype(compute_dtype)
    xc = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)
    wc = np.asarray(jnp.asarray(weight).astype(jnp.float32), np.float64)
    y64, magnitude = xc @ wc.T, np.abs(xc) @ np.abs(wc).T
    if bias is not None:
        bc = np.asarray(jnp.asarray(bias).astype(dtype).astype(jnp.float32), np.float64)
        y64, magnitude = y64 + bc, magnitude + np.abs(bc)
    return y64, magnitude


def output_error_bound(y64, magnitude, k: int, compute_dtype, out_dtype):
    """[M, N] float64: the largest |y - y64| the module docstring allows."""
    accumulation = 2 * (k + 2) * 2.0**-24 * magnitude
    bound = accumulation
    for dtype in (jnp.dtype(compute_dtype), jnp.dtype(out_dtype)):
        if dtype != jnp.float32:
            bound = bound + UNIT_ROUNDOFF[dtype] * (np.abs(y64) + bound)
    return bound


def output_errors(y, y64, magnitude, k: int, compute_dtype, out_dtype) -> int:
    """How many elements of y are non-finite (where y64 is finite) or outside the bound."""
    got = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    bound = output_error_bound(y64, magnitude, k, compute_dtype, out_dtype)
    bad = ~np.isfinite(got) | (np.abs(got - y64) > bound)
    return int(np.sum(bad & np.isfinite(y64)))
