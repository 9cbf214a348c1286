"""Correctness of the Pallas int8 matmul kernels on a GPU: `python3 tools/gpu_check.py`.

Fresh random inputs every run (seed printed). For every shape (odd ones included):
- the activation pass equals reference.quantize_rows (run by XLA on the same GPU) bit for bit;
- the int32 accumulator of each plan's GEMM (the one-launch fused kernel for M <= 64, the GEMM
  kernel otherwise, both outlier modes, split-K, both weight layouts, [K, N] transposed), written
  into an INT32_MIN-poisoned buffer, equals XLA's int8 dot of the reference-quantized inputs bit
  for bit;
- the whole op, its kernel writing into a NaN-poisoned buffer, is finite everywhere and within
  checks.output_error_bound of the recipe evaluated in float64 on the host (the fused kernel
  with checks.weight_rounding added);
- the stats' outlier column count equals the reference's, and the kernels' routes never report
  a capacity overflow (they have no capacity).
Exits 1 on any failure. `--quick` runs a subset; `--outliers` runs the op's shapes at outlier
column counts from 0 to K (the gathered stream, the in-place sweep, every column an outlier).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.int8_matmul import checks, configs, reference  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton.outliers import (  # noqa: E402
    SLOT_BLOCK,
    gather_slots,
    outlier_operands,
    outlier_operands_reference,
)
from jint8.ops.int8_matmul.pallas_triton.quantize import quantize_rows  # noqa: E402
from jint8.ops.int8_matmul.testing import int8_accumulator_pallas, int8_matmul_poisoned  # noqa: E402

THRESHOLD = 6.0

# (M, K, N): odd, tiny, tile-aligned, skinny and large.
SHAPES_QUICK = [(1, 77, 45), (3, 200, 129), (16, 4096, 4096), (70, 512, 1000),
                (256, 4096, 1024), (1024, 1024, 777)]
SHAPES_FULL = SHAPES_QUICK + [(17, 1000, 333), (64, 4096, 14336), (1, 8192, 28672),
                              (300, 1536, 2048), (4096, 4096, 4096), (33, 129, 4097)]


def make_inputs(rng, m, k, n, dtype, num_outlier_cols, with_bias, extreme=False,
                special_rows=False):
    x = rng.standard_normal((m, k)).astype(np.float32)
    if extreme:  # |xq| = 127 everywhere and wq = 127: the largest exact sums the MMAs must hold
        x = np.full((m, k), 1.5, np.float32)
    cols = rng.choice(k, size=min(num_outlier_cols, k), replace=False)
    rows = rng.integers(0, m, size=cols.size)
    x[rows, cols] = rng.choice([-1.0, 1.0], cols.size) * rng.uniform(6.0, 40.0, cols.size)
    if special_rows:  # a zero row and (M > 1) a row of outliers only: s_x = 0 for both
        x[0] = 0.0
        if m > 1:
            x[1] = np.where(np.arange(k) % 2, 7.0, -9.0)
    wq = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    if extreme:
        wq = np.full((k, n), 127, np.int8)
    col_scales = rng.uniform(0.01, 2.0, size=n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    return (jnp.asarray(x, dtype), jnp.asarray(wq), jnp.asarray(col_scales),
            None if bias is None else jnp.asarray(bias))


def plans_to_check(m, k, n, table_only=False):
    """The plans the GPU's tables pick for both weight layouts, plus the variants they do not:
    the other outlier mode and row-scale source, split-K, the two-kernel route for skinny M, the
    other layout, and for M > 16 the other of the "pallas" / "xla_gemm" routes."""
    kind = jax.devices()[0].device_kind
    plan = configs.plan_for(kind, m, k, n, weight_layout="nk")
    plans = [plan, configs.plan_for(kind, m, k, n, weight_layout="kn")]
    if table_only:
        return plans
    replace = dataclasses.replace
    if plan.gemm_path == "fused":
        other_mode = "dense" if plan.gemm.outlier_mode == "branch" else "branch"
        plans.append(replace(plan, gemm=replace(plan.gemm, outlier_mode=other_mode)))
        other_scales = "input" if plan.gemm.row_scales == "kernel" else "kernel"  # XLA's absmax / the sweep
        plans.append(replace(plan, gemm=replace(plan.gemm, row_scales=other_scales)))
        plans.append(replace(plan, gemm=replace(plan.gemm, split_k=plan.gemm.split_k % 3 + 2)))
        pallas = configs.plan_for("no table", 65, k, n, weight_layout="nk")
        plans.append(replace(pallas, gemm=replace(pallas.gemm, block_m=16 if m <= 16 else 64)))
    else:
        plans.append(replace(plan, gemm=replace(plan.gemm, weight_layout="kn")))
        other_path = "pallas" if plan.gemm_path == "xla_gemm" else "xla_gemm"
        plans.append(replace(plan, gemm_path=other_path,
                             gemm=configs.route_config(other_path, replace(plan.gemm, split_k=1))))
    return plans


def check_case(rng, m, k, n, dtype, num_outlier_cols, with_bias, failures,
               interpret=False, extreme=False, table_only=False, special_rows=False):
    x, wq, col_scales, bias = make_inputs(rng, m, k, n, dtype, num_outlier_cols, with_bias,
                                          extreme, special_rows)
    label = (f"M={m} K={k} N={n} {jnp.dtype(dtype).name} outliers={num_outlier_cols} "
             f"bias={with_bias}")
    ref_q = reference.quantize_rows(x, THRESHOLD)
    y64, magnitude = checks.float64_recipe(x, wq, col_scales, bias, threshold=THRESHOLD)
    rounding = checks.weight_rounding(x, wq, col_scales, threshold=THRESHOLD)
    ref_acc = np.asarray(reference.int8_dot(ref_q[0], wq))
    _, ref_stats = reference.int8_matmul_reference(
        x, wq, col_scales, bias, threshold=THRESHOLD, outlier_capacity=k)
    num_outliers = int(ref_stats.num_outlier_columns)
    for plan in plans_to_check(m, k, n, table_only):
        tag = (f"{label} {plan.gemm_path}{' transposed' if plan.transpose_weight else ''} "
               f"{plan.gemm}")
        fused = plan.gemm_path == "fused"
        if not fused:
            got_q = quantize_rows(x, THRESHOLD, config=plan.quantize, interpret=interpret)
            for name, got, want in zip(("xq", "row_scales", "col_mask"), got_q, ref_q):
                if not np.array_equal(np.asarray(got), np.asarray(want)):
                    failures.append(f"{tag}: activation pass {name} differs from reference")
        w = wq.T if plan.reads_layout() == "nk" else wq
        acc = int8_accumulator_pallas(x, w, threshold=THRESHOLD, plan=plan, poison_output=True,
                                      interpret=interpret)
        if not np.array_equal(np.asarray(acc), ref_acc):
            bad = int(np.sum(np.asarray(acc) != ref_acc))
            failures.append(f"{tag}: int32 accumulator differs from XLA in {bad} elements")
        y, stats = int8_matmul_poisoned(
            x, w, col_scales, bias, threshold=THRESHOLD, out_dtype=jnp.dtype(dtype), plan=plan,
            interpret=interpret)
        # One term per outlier column, one partial per K step of the fused kernel or slot step.
        stream_terms = num_outliers + -(-k // min(plan.gemm.block_k, SLOT_BLOCK)) + 2
        ratio = checks.max_bound_violation(y, y64, magnitude, dtype, stream_terms=stream_terms,
                                           split_k=plan.gemm.split_k,
                                           weight_rounding=rounding)
        if not ratio <= 1.0:
            failures.append(f"{tag}: output error {ratio:.3g} x the bound (inf: non-finite)")
        if (int(stats.num_outlier_columns), bool(stats.capacity_overflow)) != (
                num_outliers, False):
            failures.append(f"{tag}: stats {stats} != reference {ref_stats}")
        rel = float(np.linalg.norm(np.asarray(y, np.float64) - y64) / np.linalg.norm(y64))
        print(f"  ok? {ratio <= 1.0}  {tag}  err/bound={ratio:.3f}  rel_l2={rel:.2e}", flush=True)


def check_norm_case(rng, m, k, n, dtype, unit_offset, failures, interpret=False):
    """The fused kernel with a folded InputNorm (the decode route of Llama's qkv / gate_up)."""
    x, scale, wq = checks.exact_norm_inputs(rng, m, k, n, dtype)
    check_folded_case(rng, f"norm M={m} K={k} N={n} {jnp.dtype(dtype).name} unit_offset={unit_offset}",
                      x, wq, {"norm": reference.InputNorm(scale, 1e-5, unit_offset)}, failures,
                      interpret)


def check_gate_case(rng, m, k, n, dtype, failures, interpret=False):
    """The fused kernel with a folded silu InputGate (the decode route of Llama's down_proj,
    x [M, 2K] = gate | up)."""
    x, wq = checks.exact_gate_inputs(rng, m, k, n, dtype)
    check_folded_case(rng, f"gate M={m} K={k} N={n} {jnp.dtype(dtype).name}", x, wq,
                      {"gate": reference.InputGate("silu")}, failures, interpret)


def check_folded_case(rng, label, x, wq, folded, failures, interpret=False):
    """The fused kernel with a folded prologue, folded = {"norm": InputNorm} or {"gate": InputGate}.

    On the exact inputs x (checks.exact_norm_inputs / exact_gate_inputs: every rounding of the
    reference well defined) the int32 accumulator must equal XLA's on the reference's op input
    unless the GPU's rsqrt, exp or division differ between XLA and Triton, which this reports.
    Random inputs of x's shape: output within 2 % of the XLA route
    (int8_matmul_reference(x, norm= / gate=)) relative to max |y|. Also reported, not checked:
    elements where XLA's jitted norm(x) / gate(x) differs from op-by-op (its excess-precision
    rule dropping a 16-bit rounding), which the unfolded routes of a jitted model would see.
    """
    m, n, k = x.shape[0], *wq.shape
    plan = configs.plan_for(jax.devices()[0].device_kind, m, k, n, weight_layout="nk")
    label = f"{label} {plan.gemm_path}"
    if plan.gemm_path != "fused":
        print(f"  skipped {label}: not the fused route", flush=True)
        return
    col_scales = jnp.asarray(rng.uniform(0.01, 2.0, n).astype(np.float32))
    acc = np.asarray(int8_accumulator_pallas(x, wq, threshold=THRESHOLD, plan=plan,
                                             interpret=interpret, **folded))
    op_input = reference.op_input(x, **folded)
    want = np.asarray(reference.int8_dot(reference.quantize_rows(op_input, THRESHOLD)[0], wq, "nk"))
    mismatched = int(np.sum(acc != want))
    x = jnp.asarray(rng.standard_normal(x.shape) * 3.0, x.dtype)
    y = np.asarray(int8_matmul_pallas(x, wq, col_scales, threshold=THRESHOLD, outlier_capacity=64,
                                      weight_layout="nk", plan=plan, interpret=interpret,
                                      **folded)[0], np.float64)
    y_ref = np.asarray(reference.int8_matmul_reference(
        x, wq, col_scales, threshold=THRESHOLD, outlier_capacity=64, weight_layout="nk",
        **folded)[0], np.float64)
    rel = float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)))
    jitted = jax.jit(lambda x: reference.op_input(x, **folded))(x)
    jit_differs = int(np.sum(np.asarray(jitted != reference.op_input(x, **folded))))
    ok = mismatched == 0 and np.all(np.isfinite(y)) and rel <= 2e-2
    if not ok:
        failures.append(label)
    print(f"  ok? {ok}  {label}  grid accumulator mismatches={mismatched}  random rel={rel:.2e}"
          f"  XLA jit/eager op input differs={jit_differs}", flush=True)


def check_output_gate_case(rng, m, k, n, dtype, failures, interpret=False):
    """The table's plan with an OutputGate (Llama's fused gate_up at decode, wq [2I, K]): the
    output written into a poisoned buffer must be finite, equal output_gate of the same plan's
    [M, 2I] product except where the GPU's exp or division differ between Triton and XLA (counted
    and reported; those elements must still lie within 1e-2 of max |y|), and within 2 % of the
    XLA route (int8_matmul_reference(output_gate=))."""
    plan = configs.plan_for(jax.devices()[0].device_kind, m, k, n, weight_layout="nk")
    label = f"output_gate M={m} K={k} N={n} {jnp.dtype(dtype).name} {plan.gemm_path} {plan.gemm}"
    x, wq, col_scales, bias = make_inputs(rng, m, k, n, dtype, 8, True)
    wq = wq.T  # [2I, K]
    output_gate = reference.OutputGate("silu")
    kwargs = dict(threshold=THRESHOLD, out_dtype=jnp.dtype(dtype), plan=plan, interpret=interpret)
    y, _ = int8_matmul_poisoned(x, wq, col_scales, bias, output_gate=output_gate, **kwargs)
    product, _ = int8_matmul_poisoned(x, wq, col_scales, bias, **kwargs)
    y, gated = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (y, output_gate(product)))
    y_ref = np.asarray(jnp.asarray(reference.int8_matmul_reference(
        x, wq, col_scales, bias, threshold=THRESHOLD, outlier_capacity=64, weight_layout="nk",
        output_gate=output_gate)[0], jnp.float32), np.float64)
    scale = np.max(np.abs(y_ref))
    differs = int(np.sum(y != gated))
    rel_gated = float(np.max(np.abs(y - gated)) / scale)
    rel = float(np.max(np.abs(y - y_ref)) / scale)
    ok = y.shape == (m, n // 2) and bool(np.all(np.isfinite(y))) and rel_gated <= 1e-2 and rel <= 2e-2
    if not ok:
        failures.append(label)
    print(f"  ok? {ok}  {label}  differs from gating the product in {differs} of {y.size} "
          f"(max {rel_gated:.2e})  vs XLA rel={rel:.2e}", flush=True)


def check_outlier_operands(rng, failures, interpret=False):
    """The outlier-operands kernel (column list, count, dense flag, xq zeroed on every outlier
    column, x and weight compacted when the count fits) equals its jnp reference bit for bit
    where it writes: every program writes the shared list and reads it back after a block
    barrier, so a race would show here first."""
    cases = [(256, 8192, 28672, 8, "nk"), (4096, 4096, 4096, 8, "kn"),
             (300, 777, 513, 40, "nk"), (70, 1000, 333, 0, "nk"),
             (1024, 14336, 4096, 64, "nk"), (512, 14336, 4096, 3584, "nk"),
             (512, 4096, 14336, 1024, "nk"), (256, 14336, 4096, 14336, "nk"),
             (512, 4096, 4096, 3000, "kn")]
    if interpret:
        cases = [(70, 129, 300, 5, "nk"), (3, 200, 33, 12, "kn"), (40, 300, 513, 150, "nk")]
    for m, k, n, flagged, layout in cases:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        xq = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
        wq = jnp.asarray(rng.integers(-127, 128, (n, k) if layout == "nk" else (k, n),
                                      dtype=np.int8))
        flags = np.zeros(k, np.int32)
        flags[rng.choice(k, flagged, replace=False)] = 1
        args = (x, xq, wq, jnp.asarray(flags))
        kw = dict(gather_slots=gather_slots(k), weight_layout=layout)
        got = outlier_operands(*args, **kw, interpret=interpret)
        want = jax.jit(functools.partial(outlier_operands_reference, **kw))(*args)
        bad = [name for name in ("xq", "count", "dense")
               if not np.array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)))]
        if not np.array_equal(np.asarray(got.slots)[:flagged], np.asarray(want.slots)[:flagged]):
            bad.append("slots")
        if flagged <= kw["gather_slots"]:
            written = -(-flagged // SLOT_BLOCK) * SLOT_BLOCK
            w_got, w_want = (np.asarray(a) if layout == "nk" else np.asarray(a).T
                             for a in (got.w_o, want.w_o))
            if not np.array_equal(np.asarray(got.x_o)[:, :written], np.asarray(want.x_o)[:, :written]):
                bad.append("x_o")
            if not np.array_equal(w_got[:, :written], w_want[:, :written]):
                bad.append("w_o")
        label = f"outlier operands M={m} K={k} N={n} {layout} flagged={flagged}"
        if bad:
            failures.append(f"{label}: {bad} differ")
        print(f"  ok? {not bad}  {label}", flush=True)


# The op's shapes (Llama-3-8B's four projections and one 8192 x 28672 layer) and the outlier
# column counts of its performance sweep (bench_int8_matmul.py --outlier-sweep).
OUTLIER_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 28672)]


def outlier_counts(k):
    return (0, 8, 64, 256, 1024, k // 4, k)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tables", action="store_true",
                        help="only the tuned table's plan per bucket, one shape per bucket")
    parser.add_argument("--norm", action="store_true",
                        help="only the fused kernel with a folded RMSNorm (Llama's decode route)")
    parser.add_argument("--gate", action="store_true",
                        help="only the fused kernel with a folded silu(gate) * up (Llama's down_proj)")
    parser.add_argument("--output-gate", action="store_true",
                        help="only the table's plans gating a gate|up product (Llama's gate_up)")
    parser.add_argument("--large-m", action="store_true",
                        help="only cases with M > 16 (the pallas and xla_gemm routes)")
    parser.add_argument("--outliers", action="store_true",
                        help="the op's shapes at outlier column counts 0 .. K, table plans only")
    parser.add_argument("--outlier-ms", type=lambda v: [int(m) for m in v.split(",")],
                        default=[1, 16, 256, 512], help="--outliers: the Ms (default 1,16,256,512)")
    parser.add_argument("--interpret", action="store_true",
                        help="dry run of this script on CPU: tiny shapes, Pallas interpret mode")
    args = parser.parse_args()
    seed = int(time.time_ns() % 2**31)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; seed {seed}", flush=True)
    rng = np.random.default_rng(seed)
    failures: list[str] = []
    scales = rng.uniform(1e-3, 100.0, 1 << 20).astype(np.float32)
    on_device = np.asarray(jax.jit(lambda s: 127.0 / s)(jnp.asarray(scales)))
    print(f"127/s: device f32 division differs from IEEE in "
          f"{int(np.sum(on_device != np.float32(127.0) / scales))} of {scales.size}", flush=True)
    shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    case = functools.partial(check_case, rng, failures=failures, interpret=args.interpret)
    start = time.time()
    if args.tables:
        table_case = functools.partial(case, table_only=True)
        table_case(1, 4096, 1000, jnp.bfloat16, 8, True)
        table_case(16, 8192, 28672, jnp.bfloat16, 8, False)
        table_case(40, 1000, 333, jnp.float16, 8, True)
        table_case(256, 4096, 1024, jnp.bfloat16, 8, False)
        table_case(200, 14336, 4096, jnp.bfloat16, 8, True)  # a per-shape split-K K loop
        table_case(300, 777, 513, jnp.bfloat16, 300, True)  # more than gathered: the in-place sweep
        table_case(1024, 1024, 777, jnp.float32, 8, False)
    elif args.norm:
        for m, k, n in [(1, 4096, 6144), (1, 4096, 28672), (8, 4096, 6144), (16, 4096, 28672),
                        (1, 2048, 3072), (3, 77, 45)] if not args.interpret else [(3, 77, 45)]:
            for dtype, unit_offset in ((jnp.bfloat16, False), (jnp.float16, False),
                                       (jnp.bfloat16, True)):
                check_norm_case(rng, m, k, n, dtype, unit_offset, failures, args.interpret)
    elif args.gate:  # down_proj of Llama-3-8B (K = 14336) and of smaller models
        for m, k, n in [(1, 14336, 4096), (8, 14336, 4096), (16, 14336, 4096), (1, 8192, 2048),
                        (1, 5632, 2048), (3, 77, 45)] if not args.interpret else [(3, 77, 45)]:
            for dtype in (jnp.bfloat16, jnp.float16):
                check_gate_case(rng, m, k, n, dtype, failures, args.interpret)
    elif args.output_gate:  # gate_up of Llama-3-8B (2I = 28672) and of smaller models
        for m, k, n in [(1, 4096, 28672), (8, 4096, 28672), (16, 4096, 28672), (40, 4096, 28672),
                        (1, 2048, 16384), (1, 77, 46)] if not args.interpret else [(3, 77, 46)]:
            for dtype in (jnp.bfloat16, jnp.float16):
                check_output_gate_case(rng, m, k, n, dtype, failures, args.interpret)
    elif args.outliers:
        check_outlier_operands(rng, failures)
        for k, n in OUTLIER_SHAPES:
            for m in args.outlier_ms:
                # The fused route (M <= 16) has had no capacity all along: its ends only.
                counts = outlier_counts(k) if m > configs.FUSED_MAX_M else (0, 64, k)
                for count in counts:
                    case(m, k, n, jnp.bfloat16, count, count % 2 == 0, table_only=True)
    elif args.large_m:
        check_outlier_operands(rng, failures)
        case(70, 1000, 333, jnp.float16, 8, True)
        case(70, 1000, 333, jnp.float32, 8, False)
        case(70, 1000, 333, jnp.bfloat16, 0, True)  # no outliers
        case(256, 4096, 1024, jnp.bfloat16, 8, False)
        case(300, 777, 513, jnp.bfloat16, 300, True)  # more than gathered: the in-place sweep
        case(1024, 1024, 777, jnp.bfloat16, 8, True)
        case(4096, 4096, 4096, jnp.bfloat16, 8, False)
    elif args.interpret:
        check_outlier_operands(rng, failures, interpret=True)
        case(3, 200, 129, jnp.bfloat16, 8, True)
        case(17, 100, 33, jnp.float32, 12, False)
        case(1, 77, 45, jnp.bfloat16, 3, True, special_rows=True)
    else:
        for i, (m, k, n) in enumerate(shapes):
            case(m, k, n, jnp.bfloat16, 8, i % 2 == 0)  # outliers present
        m, k, n = 70, 1000, 333
        case(m, k, n, jnp.float16, 8, True)
        case(m, k, n, jnp.float32, 8, False)
        case(m, k, n, jnp.bfloat16, 0, True)  # no outliers
        case(16, 4096, 1000, jnp.bfloat16, 1024, False)  # many outlier columns, fused
        case(300, 777, 513, jnp.bfloat16, 777, True)  # every column, large M
        case(64, 8192, 512, jnp.bfloat16, 0, False, extreme=True)
        case(64, 8192, 512, jnp.bfloat16, 3, True, extreme=True)
        case(1, 4096, 1024, jnp.bfloat16, 200, False)  # many outlier columns, decode
        case(7, 1000, 333, jnp.float16, 3, True, special_rows=True)  # zero/all-outlier rows
        check_outlier_operands(rng, failures)
    print(f"{len(failures)} failures in {time.time() - start:.0f} s")
    for failure in failures:
        print("FAIL", failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
