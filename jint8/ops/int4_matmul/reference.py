"""Plain jnp 4-bit (NF4 / FP4) matmul: the CPU path and the truth every kernel is held to.

bitsandbytes 0.50's Linear4bit.forward (nn/modules.py) casts x to the layer's compute dtype and
calls matmul_4bit, whose inference path is the gemm_4bit op; its default implementation
(backends/default/ops.py _gemm_4bit_default_impl, which CUDA also runs where it has no fused
kernel) is:
1. absmax: float32 per block, or dequantize_blockwise(absmax_8bit) + offset (double quantization)
2. w = dequantize_4bit(packed, absmax, ...) straight to the compute dtype: code_book[code] *
   absmax[block] in float32, one rounding to the compute dtype, shape [N, K]
3. y = torch.nn.functional.linear(x, w, bias) in the compute dtype, then cast to x's dtype
This reference does the same, with step 3 as one XLA dot accumulating in float32 and the bias
added in float32 before the one rounding to the compute dtype (torch's CPU addmm does the same
for 16-bit inputs; its summation order is its own, so results agree to float rounding, not bits).

Not matched: on CPUs with AVX512-BF16, bitsandbytes' inference forward instead repacks the weight
and runs a fused bf16 kernel (gemv_4bit, bf16 activations and bf16 absmax); its result differs
from the dequantize-then-matmul one by bf16 rounding of the absmax.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def dequantized_weight(w, dtype) -> jax.Array:
    """Step 1-2: the [N, K] weight an Int4Weight stands for, rounded once to dtype."""
    return w.dequantize(dtype)


def int4_matmul_reference(x: jax.Array, w, bias: Optional[jax.Array], *, compute_dtype, out_dtype) -> jax.Array:
    """x [M, K] @ dequantize(w [N, K]).T + bias [N] -> [M, N] in out_dtype (bitsandbytes' gemm_4bit)."""
    return matmul_dequantized(x, dequantized_weight(w, compute_dtype), bias, compute_dtype=compute_dtype,
                              out_dtype=out_dtype)


def matmul_dequantized(x: jax.Array, weight: jax.Array, bias: Optional[jax.Array], *, compute_dtype,
                       out_dtype) -> jax.Array:
    """Step 3: x [M, K] @ weight [N, K] (already dequantized to compute_dtype).T + bias -> [M, N]."""
    x = x.astype(compute_dtype)
    y = jax.lax.dot_general(x, weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if bias is not None:
        # bitsandbytes casts the bias to the compute dtype first (Linear4bit.forward)
        y = y + bias.astype(compute_dtype).astype(jnp.float32)
    return y.astype(compute_dtype).astype(out_dtype)
