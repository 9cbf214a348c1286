"""The "pallas_triton" backend of int8_matmul: Pallas (Triton lowering) kernels, no host syncs.

Computes reference.int8_matmul_reference's function. Per shape bucket the plan
(configs.plan_for, tuned per GPU in data/*.json) picks one of three routes:
- "fused" (M <= configs.FUSED_MAX_M, decode): one kernel does everything (fused.py): no
  capacity, no index list, one launch per call;
- "pallas": the activation-pass kernel, the outlier-operands kernel (the list of every outlier
  column, its count, x and the weight compacted on it, xq's columns on it zeroed:
  outliers.py) and the GEMM kernel (gemm.py) with the whole epilogue fused. No capacity: the
  outlier stream's length is the batch's count, read on the device, and past a quarter of K
  the stream sweeps the weight in place (a flag the GEMM reads), never a lax.cond;
- "xla_gemm" (large M): the same activation pass, XLA's own int8 GEMM (cuBLAS, int32 out) for
  xq @ wq, then the GEMM kernel's epilogue alone on that accumulator (int8_gemm(accumulator=)):
  the outlier stream, scales, bias and cast in one pass. It writes
  and reads the int32 [M, N] once, and is faster where cuBLAS's int8 GEMM beats the Triton K
  loop.
[K, N] weights at M > 64 are transposed by XLA first where the plan says so (Triton's int8 MMA
wants K-major operands). docs/decisions.md records which bucket uses what and why.

The kernels share common.py (loads, dots, tiles, the epilogue, launch); quantize.py is the
activation pass. The correctness checks reach these routes through ../testing.py.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jint8.ops._platform import triton_gpu_unsupported_reason
from jint8.ops.int8_matmul import prologue, reference
from jint8.ops.int8_matmul.api import Backend
from jint8.ops.int8_matmul.configs import KernelPlan, fit_to_activations, plan_for
from jint8.ops.int8_matmul.pallas_triton.common import NO_PROBE, Probe
from jint8.ops.int8_matmul.pallas_triton.fused import fused_int8_matmul
from jint8.ops.int8_matmul.pallas_triton.gemm import int8_gemm
from jint8.ops.int8_matmul.pallas_triton.outliers import gather_slots, outlier_operands
from jint8.ops.int8_matmul.pallas_triton.quantize import quantize_rows_unmasked

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
    norm: Optional[prologue.InputNorm] = None,
    gate: Optional[prologue.InputGate] = None,
    output_gate: Optional[prologue.OutputGate] = None,
    plan: Optional[KernelPlan] = None,
    interpret: bool = False,
    split_partials: bool = False,
) -> tuple[jax.Array, reference.Int8MatmulStats]:
    """LLM.int8() matmul, x: [M, K] float ([M, 2K] with a gate), wq: [K, N] int8, col_scales:
    [N] f32 -> [M, N].

    outlier_capacity: the op's static gather size on the XLA reference; unused here: every
      route of these kernels takes any number of outlier columns (stats never overflow).
    weight_layout: "kn" (wq[K, N]) or "nk" (wq[N, K], K-major, what Int8Weight stores).
    norm: an RMSNorm applied to x first: in the fused kernel's prologue, else by XLA.
    gate: x is [M, 2K] = gate | up, the op's input act(gate) * up: formed in the fused kernel's
      prologue, else by XLA.
    output_gate: the [M, N] result is gate | up and [M, N / 2] act(gate) * up is returned:
      formed in the fused kernel's epilogue (split_k == 1), else by XLA on the result.
    plan: kernels and tiles; default: the tuned plan of the current GPU, this shape and this
      weight layout. An explicit plan must take this layout (plan.reads_layout()).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    split_partials: return [S, M, N]: the fused kernel's float32 split-K partials where the plan
      allows it (FusedConfig.split_partials; the caller sums them), else the result as [1, M, N].

    The correctness checks' instruments (an int32 accumulator, a poisoned output buffer) are
    testing.py's entry points, not arguments here.
    """
    del outlier_capacity
    return run(x, wq, col_scales, bias, threshold=threshold, out_dtype=out_dtype,
               weight_layout=weight_layout, norm=norm, gate=gate, output_gate=output_gate,
               plan=plan, interpret=interpret, split_partials=split_partials)


def run(x, wq, col_scales, bias=None, *, threshold: float, out_dtype=None, weight_layout: str,
        norm=None, gate=None, output_gate=None, plan: Optional[KernelPlan] = None,
        interpret: bool = False, split_partials: bool = False, probe: Probe = NO_PROBE):
    """int8_matmul_pallas with a probe (common.Probe): the one entry of the routes, for the op
    (probe=NO_PROBE) and for testing.py. Resolves the default plan, then runs the
    jitted routes."""
    m = x.shape[0]
    k, n = wq.shape if weight_layout == "kn" else wq.shape[::-1]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if plan is None:
        plan = plan_for(jax.devices()[0].device_kind, m, k, n, weight_layout)
    elif plan.reads_layout() != weight_layout:
        raise ValueError(
            f"plan reads weight_layout={plan.reads_layout()!r} != weight_layout={weight_layout!r}"
        )
    plan = fit_to_activations(plan, x.dtype)
    return _int8_matmul_pallas(
        x, wq, col_scales, bias, norm, gate, output_gate, threshold=float(threshold),
        out_dtype=out_dtype, plan=plan, interpret=interpret, split_partials=split_partials,
        probe=probe,
    )


@functools.partial(
    jax.jit,
    static_argnames=("threshold", "out_dtype", "plan", "interpret", "split_partials", "probe"),
)
def _int8_matmul_pallas(x, wq, col_scales, bias, norm=None, gate=None, output_gate=None, *, threshold,
                        out_dtype, plan, interpret, split_partials=False, probe=NO_PROBE):
    # Unsummed partials only where the plan allows them and the fused kernel makes them (S > 1;
    # an output gate needs whole sums); every other call returns its result as [1, M, N].
    partials = (split_partials and plan.gemm_path == "fused" and plan.gemm.split_k > 1
                and plan.gemm.split_partials and output_gate is None)
    y, stats = _routes(x, wq, col_scales, bias, norm, gate, output_gate, threshold=threshold,
                       out_dtype=out_dtype, plan=plan, interpret=interpret,
                       split_partials=partials, probe=probe)
    return (y[None] if split_partials and not partials else y), stats


def _routes(x, wq, col_scales, bias, norm, gate, output_gate, *, threshold, out_dtype, plan,
            interpret, split_partials, probe):
    accumulator_only = probe.accumulator_only
    if plan.gemm_path == "fused":
        # Stats in plain jnp: XLA drops them when the caller does not use them. No capacity
        # on this route, so it never overflows.
        op_input = prologue.op_input(x, norm, gate)
        num_outliers = jnp.sum(reference.outlier_column_mask(op_input, threshold), dtype=jnp.int32)
        stats = reference.Int8MatmulStats(num_outliers, jnp.zeros((), bool))
        # The kernel's epilogue gates when it holds whole sums (no split-K partials).
        in_epilogue = output_gate if plan.gemm.split_k == 1 and not accumulator_only else None
        y = fused_int8_matmul(
            x, wq, col_scales,
            _bias_operand(bias, col_scales),
            norm, gate=gate, output_gate=in_epilogue, config=plan.gemm, threshold=threshold,
            out_dtype=out_dtype, has_bias=bias is not None, probe=probe, interpret=interpret,
            split_partials=split_partials,
        )
        if output_gate is not None and in_epilogue is None and not accumulator_only:
            y = output_gate(y)  # XLA fuses it into the split-K sum
        return y, stats
    x = prologue.op_input(x, norm, gate)
    if plan.transpose_weight:
        wq = wq.T  # [K, N] -> K-major [N, K] for the GEMM (KernelPlan.transpose_weight)
    layout = plan.gemm.weight_layout

    xq, row_scales, col_flags = quantize_rows_unmasked(
        x, threshold=threshold, config=plan.quantize, interpret=interpret
    )
    k = x.shape[1]
    has_bias = bias is not None
    bias_operand = _bias_operand(bias, col_scales)
    # These routes have no capacity (outlier_capacity sizes the XLA reference's gather only):
    # any number of outlier columns is computed exactly, at a cost that follows the count.
    no_overflow = jnp.zeros((), bool)
    # The outlier operands (pallas_triton.outliers), then the GEMM kernel with the stream.
    if threshold > 0:
        outliers = outlier_operands(x, xq, wq, col_flags, gather_slots=gather_slots(k),
                                    weight_layout=layout, interpret=interpret)
        xq = outliers.xq
        outlier_args = (outliers.x_o, outliers.w_o, col_flags, outliers.count, outliers.dense)
    else:  # no outlier terms: the kernel reads none of these operands
        outlier_args = (x, wq, col_flags, col_flags, col_flags)
    accumulator = reference.int8_dot(xq, wq, layout) if plan.gemm_path == "xla_gemm" else None
    y = int8_gemm(
        xq, wq, row_scales, col_scales, bias_operand, x, *outlier_args,
        accumulator, config=plan.gemm, out_dtype=out_dtype, has_bias=has_bias,
        has_outliers=threshold > 0, dense_fallback=gather_slots(k) < k, probe=probe,
        interpret=interpret,
    )
    stats = reference.Int8MatmulStats(jnp.sum(col_flags > 0, dtype=jnp.int32), no_overflow)
    if output_gate is not None and not accumulator_only:
        y = output_gate(y)
    return y, stats


def _bias_operand(bias, col_scales):
    """The kernels' [N] bias operand: the bias, or without one any [N] float32 array they leave
    unread (has_bias=False): col_scales, rather than a zero vector that XLA would fill with a
    kernel of its own on every call (one per projection of a decode step)."""
    return col_scales if bias is None else bias


def unsupported_reason(x: jax.Array, wq: jax.Array) -> Optional[str]:
    """None when the Triton kernels can run this call, else why not."""
    del x, wq  # every shape and dtype the op validates runs
    return triton_gpu_unsupported_reason()


BACKEND = Backend(BACKEND_NAME, int8_matmul_pallas, unsupported_reason,
                  partials_impl=functools.partial(int8_matmul_pallas, split_partials=True))


def __getattr__(name):
    # The checks' entry point, at its old address (testing.py imports this package, so it is
    # looked up on first use rather than imported here).
    if name == "int8_accumulator_pallas":
        from jint8.ops.int8_matmul.testing import int8_accumulator_pallas

        return int8_accumulator_pallas
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
