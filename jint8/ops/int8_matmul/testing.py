"""Entry points of the correctness checks (tests/ops in interpret mode, tools/gpu_check.py on a
GPU) into the pallas_triton routes, with the instruments the op itself never uses
(pallas_triton.common.Probe): the exact int32 accumulator of a plan's GEMM, and an output
buffer poisoned before the kernel runs so that any element it did not write shows. The kernel
programs are the op's own, the instruments aside.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from jint8.ops.int8_matmul import prologue, reference
from jint8.ops.int8_matmul import pallas_triton
from jint8.ops.int8_matmul.configs import KernelPlan
from jint8.ops.int8_matmul.pallas_triton.common import Probe


def int8_accumulator_pallas(x, wq, *, threshold: float, plan: KernelPlan, norm=None, gate=None,
                            interpret: bool = False, poison_output: bool = False):
    """[M, N] int32 accumulator of the plan's GEMM: equals
    reference.int8_dot(*reference.quantize_rows(x, threshold)[:1], wq) exactly (with a norm or
    a gate: of prologue.op_input(x, norm, gate), where the kernel forms the same bits)."""
    n = wq.shape[1] if plan.reads_layout() == "kn" else wq.shape[0]
    acc, _ = pallas_triton.run(
        x, wq, jnp.ones((n,), jnp.float32), None, threshold=threshold, out_dtype=jnp.int32,
        weight_layout=plan.reads_layout(), norm=norm, gate=gate, plan=plan, interpret=interpret,
        probe=Probe(accumulator_only=True, poison_output=poison_output))
    return acc


def int8_matmul_poisoned(x, wq, col_scales, bias=None, *, threshold: float, plan: KernelPlan,
                         out_dtype=None, norm: Optional[prologue.InputNorm] = None,
                         gate: Optional[prologue.InputGate] = None,
                         output_gate: Optional[prologue.OutputGate] = None,
                         interpret: bool = False):
    """pallas_triton.int8_matmul_pallas(x, ...) on the plan, each kernel writing into a
    NaN-filled output buffer: (y, stats), y finite only where every element was written."""
    return pallas_triton.run(
        x, wq, col_scales, bias, threshold=threshold, out_dtype=out_dtype,
        weight_layout=plan.reads_layout(), norm=norm, gate=gate, output_gate=output_gate,
        plan=plan, interpret=interpret, probe=Probe(poison_output=True))
