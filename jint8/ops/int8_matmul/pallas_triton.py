"""The "pallas_triton" backend of int8_matmul: activation-pass kernel + fused int8 GEMM kernel.

Computes reference.int8_matmul_reference's function (see the kernels' module docstrings for how
each recipe step maps onto them). Between the two kernels XLA does only [K]-sized work: the
outlier column count and the static, zero-padded outlier index list (jnp.nonzero with a size).

Per shape bucket the plan (configs.plan_for, tuned per GPU in data/*.json) picks the GEMM:
"pallas" (the fused kernel) or "xla" (XLA's own int8 GEMM, our activation pass, the dequant
epilogue fused by XLA, the reference's outlier stream and its overflow lax.cond) where XLA's
GEMM measured faster; benchmarks/NOTES_int8_matmul.md records which bucket uses which and why.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jint8.ops.int8_matmul import reference
from jint8.ops.int8_matmul.api import Backend
from jint8.ops.int8_matmul.configs import KernelPlan, plan_for
from jint8.ops.int8_matmul.pallas_triton_gemm import OUTLIER_SLOT_MULTIPLE, int8_gemm
from jint8.ops.int8_matmul.pallas_triton_quantize import quantize_rows_unmasked

BACKEND_NAME = "pallas_triton"


def int8_matmul_pallas(
    x: jax.Array,
    wq: jax.Array,
    col_scales: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    threshold: float,
    outlier_capacity: int,
    out_dtype=None,
    weight_layout: str = "kn",
    plan: Optional[KernelPlan] = None,
    interpret: bool = False,
    poison_output: bool = False,
) -> tuple[jax.Array, reference.Int8MatmulStats]:
    """LLM.int8() matmul, x: [M, K] float, wq: [K, N] int8, col_scales: [N] f32 -> [M, N].

    weight_layout: "kn" (wq[K, N]) or "nk" (wq[N, K], K-major, what Int8Weight stores).
    plan: tiles and GEMM path; default: the tuned plan of the current GPU, this shape and
      this weight layout. An explicit plan's gemm.weight_layout must equal weight_layout.
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    poison_output: the GEMM writes into a NaN-filled buffer (GPU check: unwritten tiles show).
    """
    m, k = x.shape
    n = col_scales.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if plan is None:
        plan = plan_for(jax.devices()[0].device_kind, m, k, n, weight_layout)
    elif plan.gemm.weight_layout != weight_layout:
        raise ValueError(
            f"plan.gemm.weight_layout={plan.gemm.weight_layout!r} != weight_layout={weight_layout!r}"
        )
    return _int8_matmul_pallas(
        x, wq, col_scales, bias, threshold=float(threshold),
        outlier_capacity=int(outlier_capacity), out_dtype=out_dtype, plan=plan,
        interpret=interpret, poison_output=poison_output,
    )


@functools.partial(
    jax.jit,
    static_argnames=("threshold", "outlier_capacity", "out_dtype", "plan", "interpret",
                     "poison_output", "accumulator_only"),
)
def _int8_matmul_pallas(x, wq, col_scales, bias, *, threshold, outlier_capacity, out_dtype,
                        plan, interpret, poison_output=False, accumulator_only=False):
    xq, row_scales, col_flags = quantize_rows_unmasked(
        x, threshold=threshold, config=plan.quantize, interpret=interpret
    )
    col_mask = col_flags > 0
    num_outliers = jnp.sum(col_mask, dtype=jnp.int32)
    overflow = (num_outliers > outlier_capacity) if threshold > 0 else jnp.zeros((), bool)
    stats = reference.Int8MatmulStats(num_outliers, overflow)

    if plan.gemm_path == "xla" and not accumulator_only:
        y = _xla_gemm(x, xq, wq, row_scales, col_scales, bias, col_mask, threshold,
                      outlier_capacity, plan.gemm.weight_layout)
        return y.astype(out_dtype), stats

    # Capacity overflow is handled inside the GEMM kernel (a flag it reads), so no lax.cond and
    # no host round trip per call; unlike the reference it is reported through `stats` only,
    # since a logging callback would cost a device-to-host sync on every call.
    slots_n = _padded_capacity(outlier_capacity)
    slots, valid = reference.outlier_columns(col_mask, slots_n)
    valid = valid & (jnp.arange(slots_n) < outlier_capacity)
    y = int8_gemm(
        xq, wq, row_scales, col_scales,
        jnp.zeros((col_scales.shape[0],), jnp.float32) if bias is None else bias, x,
        slots, valid.astype(jnp.int32), col_flags, overflow.astype(jnp.int32).reshape(1),
        config=plan.gemm, out_dtype=out_dtype, has_bias=bias is not None,
        has_outliers=threshold > 0, dense_fallback=outlier_capacity < x.shape[1],
        accumulator_only=accumulator_only, poison_output=poison_output, interpret=interpret,
    )
    return y, stats


def _padded_capacity(capacity: int) -> int:
    """Outlier slots: the capacity rounded up to the int8 MMA's K step (at least one step)."""
    return max(1, -(-capacity // OUTLIER_SLOT_MULTIPLE)) * OUTLIER_SLOT_MULTIPLE


def int8_accumulator_pallas(x, wq, *, threshold: float, outlier_capacity: int,
                            plan: KernelPlan, interpret: bool = False, poison_output=False):
    """[M, N] int32 accumulator of the fused GEMM (checks): equals
    reference.int8_dot(*reference.quantize_rows(x, threshold)[:1], wq) exactly."""
    n = wq.shape[0] if plan.gemm.weight_layout == "nk" else wq.shape[1]
    acc, _ = _int8_matmul_pallas(
        x, wq, jnp.ones((n,), jnp.float32), None, threshold=float(threshold),
        outlier_capacity=int(outlier_capacity), out_dtype=jnp.dtype(jnp.int32), plan=plan,
        interpret=interpret, poison_output=poison_output, accumulator_only=True,
    )
    return acc


def _xla_gemm(x, xq, wq, row_scales, col_scales, bias, col_mask, threshold, outlier_capacity,
              weight_layout):
    """XLA's int8 GEMM on our activation pass's output, then the reference's epilogue."""
    xq = jnp.where(col_mask[None, :], jnp.int8(0), xq)
    acc = reference.int8_dot(xq, wq, weight_layout)
    y = reference.dequantize_accumulator(acc, row_scales, col_scales, bias)
    if threshold > 0:
        y = y + _xla_outlier_stream(x, wq, col_scales, col_mask, outlier_capacity, weight_layout)
    return y


def _xla_outlier_stream(x, wq, col_scales, col_mask, capacity, weight_layout):
    """reference.outlier_stream, with its dense overflow dot accumulated exactly in float32.

    On the H100, XLA's [M, K] x [K, N] bf16 dense fallback dot of the reference missed the
    float64 bound by 180x (gpu_check, M=300 K=777 N=513, 40 outlier columns, capacity 16), so
    that branch multiplies the same dtype-rounded operands as float32 at HIGHEST precision
    (products of 16-bit values are exact in float32). The gathered branch, [M, C] x [C, N], is
    the reference's and passed; float32 activations get HIGHEST precision everywhere (XLA's
    default on an H100 is TF32).
    """
    if capacity >= x.shape[-1]:
        with jax.default_matmul_precision("highest"):
            return reference.outlier_stream(
                x, wq, col_scales, col_mask, capacity, weight_layout)[0]
    num_outliers = jnp.sum(col_mask, dtype=jnp.int32)

    def gathered(_):
        with jax.default_matmul_precision("highest"):
            return reference.outlier_stream(
                x, wq, col_scales, col_mask, capacity, weight_layout)[0]

    def dense(_):
        jax.debug.callback(reference._warn_overflow, num_outliers, capacity)
        x_out = jnp.where(col_mask[None, :], x, 0).astype(x.dtype).astype(jnp.float32)
        w_rows = reference.weight_rows(wq, None, weight_layout)
        w_out = reference.dequantize_weight_rows(w_rows, col_scales, x.dtype).astype(jnp.float32)
        return jnp.dot(x_out, w_out, precision=jax.lax.Precision.HIGHEST)

    return jax.lax.cond(num_outliers > capacity, dense, gathered, None)


def unsupported_reason(x: jax.Array, wq: jax.Array) -> Optional[str]:
    """None when the Triton kernels can run this call, else why not."""
    try:
        platform = jax.devices()[0].platform
    except RuntimeError as error:  # no backend initialised at all
        return f"not a GPU: {error}"
    if platform != "gpu":
        return f"not a GPU (default device platform is {platform!r})"
    if "nvidia" not in jax.devices()[0].device_kind.lower() and not _is_cuda():
        return f"not an NVIDIA GPU ({jax.devices()[0].device_kind}); Triton lowering needs CUDA"
    try:
        from jax.experimental.pallas import triton as _  # noqa: F401
    except ImportError as error:
        return f"needs jax with Pallas Triton GPU lowering: {error}"
    return None


def _is_cuda() -> bool:
    return any(d.client.platform_version.lower().startswith("cuda") for d in jax.devices()[:1])


BACKEND = Backend(BACKEND_NAME, int8_matmul_pallas, unsupported_reason)
