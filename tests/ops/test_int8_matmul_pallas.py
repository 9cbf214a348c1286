"""The Pallas (Triton lowering) int8 matmul kernels, run in Pallas interpret mode on the CPU.

CI has no GPU: these tests exercise the kernels' logic (tiling, masking of odd shapes, split-K,
the outlier stream over any number of outlier columns, gathered or swept in place, both weight
layouts) through
`interpret=True`; tools/gpu_check.py runs the same checks compiled on a GPU.
Fresh random inputs per run; the seed is in every failure message.

Held to (see jint8/ops/int8_matmul/checks.py for the derivation of the float bound):
- the activation pass: equal to reference.quantize_rows bit for bit;
- the GEMM's int32 accumulator: equal to reference.int8_dot on reference-quantized inputs;
- the output: |y - y64| <= u_out |y64| + (C + S + 8) 2^-24 T against the recipe in float64
  (plus the weight rounding to x.dtype that every kernel's outlier stream skips, scaling each
  output column once instead: checks.weight_rounding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.errors import BackendUnavailableError, InvalidConfigError
from jint8.ops.int8_matmul import api, checks, configs, reference
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas, unsupported_reason
from jint8.ops.int8_matmul.pallas_triton.fused import fused_int8_matmul_reference
from jint8.ops.int8_matmul.pallas_triton.outliers import (
    SLOT_BLOCK,
    gather_slots,
    outlier_operands,
    outlier_operands_reference,
)
from jint8.ops.int8_matmul.pallas_triton.quantize import quantize_rows
from jint8.ops.int8_matmul.testing import int8_accumulator_pallas
from int8_plans import FUSED_VARIANTS, PLANS, SMALL_QUANT, THRESHOLD, fused_plan, gemm_config


def _inputs(rng, m, k, n, dtype, outlier_cols, bias=False):
    """x [M, K] ~ N(0, 1) with `outlier_cols` columns holding one |x| in [6, 40] each."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    cols = rng.choice(k, size=outlier_cols, replace=False)
    x[rng.integers(0, m, outlier_cols), cols] = rng.choice([-1, 1], outlier_cols) * rng.uniform(
        6, 40, outlier_cols)
    wq = rng.integers(-127, 128, (k, n), dtype=np.int8)
    col_scales = rng.uniform(0.01, 2.0, n).astype(np.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None
    return jnp.asarray(x, dtype), jnp.asarray(wq), jnp.asarray(col_scales), b


def _weight_for(plan, wq):
    return wq.T if plan.reads_layout() == "nk" else wq


def _special_rows(x, rows):
    """x with row 0 zero and (when M > 1) row 1 made only of outliers (s_x = 0 for both)."""
    x = np.array(x.astype(jnp.float32))
    x[0] = 0.0
    if rows == "zero_and_all_outlier" and x.shape[0] > 1:
        x[1] = np.where(np.arange(x.shape[1]) % 2, 7.0, -9.0)  # every column an outlier
    return x


@pytest.mark.parametrize("m,k", [(1, 37), (3, 200), (70, 129)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_activation_pass_equals_reference_quantize_rows(rng, m, k, dtype, threshold):
    x, *_ = _inputs(rng, m, k, 1, dtype, outlier_cols=3)
    config = configs.default_plan(m, k, 1).quantize  # whole rows (m <= 256) or 4-row chunks
    got = quantize_rows(x, threshold, config=config, interpret=True)
    want = reference.quantize_rows(x, threshold)
    for name, g, w in zip(("xq", "row_scales", "col_mask"), got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                      err_msg=f"{name}, seed {rng.seed_value}")


def test_activation_pass_zero_and_all_outlier_rows_give_zero_not_nan(rng):
    x = np.asarray(rng.standard_normal((4, 50)), np.float32)
    x[1] = 0.0
    x[2] = 10.0  # every element an outlier: s_x = 0
    xq, row_scales, _ = quantize_rows(jnp.asarray(x), THRESHOLD, config=SMALL_QUANT,
                                      interpret=True)
    assert np.all(np.asarray(xq)[1:3] == 0) and np.all(np.asarray(row_scales)[1:3] == 0)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("m,k,n,outlier_cols", [
    (1, 77, 45, 3),       # odd K and N, M = 1
    (3, 200, 129, 5),
    (70, 129, 33, 12),
    (70, 129, 33, 100),   # more than gathered (G = 64): the stream sweeps K in place
    (3, 200, 129, 200),   # every column an outlier: xq all zero
])
def test_int32_accumulator_equals_reference_int8_dot(rng, plan_name, m, k, n, outlier_cols):
    plan = PLANS[plan_name]
    x, wq, _, _ = _inputs(rng, m, k, n, jnp.bfloat16, outlier_cols)
    acc = int8_accumulator_pallas(x, _weight_for(plan, wq), threshold=THRESHOLD, plan=plan,
                                  interpret=True)
    want = reference.int8_dot(reference.quantize_rows(x, THRESHOLD)[0], wq)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(want),
                                  err_msg=f"seed {rng.seed_value}")


@pytest.mark.parametrize("m,k,n,dtype,outlier_cols,bias,plan_name", [
    (1, 77, 45, jnp.bfloat16, 3, True, "kn"),
    (3, 200, 129, jnp.float16, 5, False, "kn_split3"),
    (70, 129, 33, jnp.float32, 4, True, "kn"),
    (16, 96, 64, jnp.bfloat16, 0, False, "kn"),          # no outliers
    (70, 129, 33, jnp.bfloat16, 100, True, "kn"),        # more than gathered: swept in place
    (3, 200, 129, jnp.bfloat16, 120, False, "kn_split3"),  # swept, with split-K
    (33, 100, 70, jnp.bfloat16, 5, True, "nk"),
    (20, 600, 40, jnp.bfloat16, 150, False, "nk"),       # gathered in 3 slot chunks (G = 192)
    (5, 64, 40, jnp.float32, 5, False, "nk_split3"),
    (9, 100, 50, jnp.bfloat16, 70, True, "kn_transposed"),  # swept, [K, N] transposed
    (70, 129, 33, jnp.bfloat16, 5, True, "nk_xla_gemm"),
    (33, 100, 70, jnp.float32, 4, False, "kn_xla_gemm"),
    (70, 129, 33, jnp.float16, 129, True, "nk_xla_gemm"),   # every column: a W8A16 matmul
])
def test_output_within_derived_bound_of_float64_recipe(rng, m, k, n, dtype, outlier_cols,
                                                       bias, plan_name):
    plan = PLANS[plan_name]
    x, wq, col_scales, b = _inputs(rng, m, k, n, dtype, outlier_cols, bias)
    y, stats = int8_matmul_pallas(x, _weight_for(plan, wq), col_scales, b, threshold=THRESHOLD,
                                  outlier_capacity=4, weight_layout=plan.reads_layout(),
                                  plan=plan, interpret=True)
    assert y.dtype == dtype and y.shape == (m, n)
    assert int(stats.num_outlier_columns) == outlier_cols
    assert not bool(stats.capacity_overflow)  # no capacity on the kernels' routes
    y64, magnitude = checks.float64_recipe(x, wq, col_scales, b, threshold=THRESHOLD)
    # Float terms the outlier dot sums per element: one per outlier column (the zero-padded
    # slots and masked columns add exact zeros) and one partial per SLOT_BLOCK step.
    stream_terms = outlier_cols + -(-k // SLOT_BLOCK) + 2
    rounding = checks.weight_rounding(x, wq, col_scales, threshold=THRESHOLD)
    ratio = checks.max_bound_violation(y, y64, magnitude, dtype, stream_terms=stream_terms,
                                       split_k=plan.gemm.split_k, weight_rounding=rounding)
    assert ratio <= 1.0, f"error {ratio:.3g} x the bound, seed {rng.seed_value}"


@pytest.mark.parametrize("variant", sorted(FUSED_VARIANTS))
@pytest.mark.parametrize("m,k,n,outlier_cols,rows", [
    (1, 77, 45, 3, None),                    # decode: M = 1, odd K and N
    (1, 77, 45, 0, None),                    # no outliers
    (3, 200, 129, 5, "zero"),                # a zero row
    (16, 96, 64, 4, "zero_and_all_outlier"),  # every column an outlier
    (33, 129, 70, 12, None),                 # block_m = 64, many outlier columns, no capacity
    (16, 1500, 20, 6, None),                 # unrolled absmax sweep with a ragged last chunk
])
def test_fused_int32_accumulator_equals_reference_int8_dot(rng, variant, m, k, n, outlier_cols,
                                                            rows):
    plan = fused_plan(m, **FUSED_VARIANTS[variant])
    x, wq, _, _ = _inputs(rng, m, k, n, jnp.bfloat16, outlier_cols)
    if rows:
        x = jnp.asarray(_special_rows(x, rows), jnp.bfloat16)
    acc = int8_accumulator_pallas(x, _weight_for(plan, wq), threshold=THRESHOLD, plan=plan,
                                  interpret=True)
    want = reference.int8_dot(reference.quantize_rows(x, THRESHOLD)[0], wq)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(want),
                                  err_msg=f"seed {rng.seed_value}")


@pytest.mark.parametrize("variant", sorted(FUSED_VARIANTS))
@pytest.mark.parametrize("m,k,n,dtype,outlier_cols,bias,rows", [
    (1, 77, 45, jnp.bfloat16, 3, True, None),
    (1, 300, 64, jnp.float16, 0, False, None),
    (5, 200, 129, jnp.float32, 5, True, "zero"),
    (16, 96, 64, jnp.bfloat16, 4, False, "zero_and_all_outlier"),
    (33, 129, 70, jnp.float16, 12, True, None),
    (2, 64, 33, jnp.float32, 0, False, "zero_and_all_outlier"),
])
def test_fused_output_within_derived_bound_of_float64_recipe(rng, variant, m, k, n, dtype,
                                                             outlier_cols, bias, rows):
    plan = fused_plan(m, **FUSED_VARIANTS[variant])
    layout, split_k = plan.gemm.weight_layout, plan.gemm.split_k
    x, wq, col_scales, b = _inputs(rng, m, k, n, dtype, outlier_cols, bias)
    if rows:
        x = jnp.asarray(_special_rows(x, rows), dtype)
    # Capacity 1 would overflow the GEMM route; the fused kernel has none and never does.
    y, stats = int8_matmul_pallas(x, _weight_for(plan, wq), col_scales, b, threshold=THRESHOLD,
                                  outlier_capacity=1, weight_layout=layout, plan=plan,
                                  interpret=True)
    assert y.dtype == dtype and y.shape == (m, n)
    col_mask = reference.outlier_column_mask(x, THRESHOLD)
    assert int(stats.num_outlier_columns) == int(np.sum(np.asarray(col_mask)))
    assert not bool(stats.capacity_overflow)
    y64, magnitude = checks.float64_recipe(x, wq, col_scales, b, threshold=THRESHOLD)
    rounding = checks.weight_rounding(x, wq, col_scales, threshold=THRESHOLD)
    # Float terms of the stream per element: one per flagged column, one partial per K step.
    stream_terms = int(np.sum(np.asarray(col_mask))) + -(-k // plan.gemm.block_k) + 2
    for name, got in (("kernel", y), ("jnp reference", fused_int8_matmul_reference(
            x, _weight_for(plan, wq), col_scales, b, threshold=THRESHOLD, out_dtype=dtype,
            weight_layout=layout))):
        ratio = checks.max_bound_violation(got, y64, magnitude, dtype, stream_terms=stream_terms,
                                           split_k=split_k, weight_rounding=rounding)
        assert ratio <= 1.0, f"{name}: error {ratio:.3g} x the bound, seed {rng.seed_value}"


def test_fused_kernel_refuses_more_rows_than_its_block():
    plan = fused_plan(16)
    x = jnp.ones((17, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_m"):
        int8_matmul_pallas(x, jnp.ones((8, 64), jnp.int8), jnp.ones((8,), jnp.float32),
                           threshold=THRESHOLD, outlier_capacity=4, weight_layout="nk",
                           plan=plan, interpret=True)


def test_cpu_dispatch_falls_through_to_xla_and_refuses_forced_pallas():
    x = jnp.ones((2, 8), jnp.float32)
    wq = jnp.ones((8, 4), jnp.int8)
    assert "not a GPU" in unsupported_reason(x, wq)
    assert api.available_backends()[0] == "pallas_triton"
    assert api.select_backend(x, wq).name == "xla"
    with pytest.raises(BackendUnavailableError, match="not a GPU"):
        api.int8_matmul(x, wq, jnp.ones((4,), jnp.float32), backend="pallas_triton")


@pytest.mark.parametrize("field,value", [("block_m", 8), ("block_n", 48), ("block_k", 16),
                                         ("num_warps", 3), ("num_stages", 0), ("split_k", 0),
                                         ("weight_layout", "kk"), ("outlier_mode", "sparse"),
                                         ("split_partials", "consumer"), ("row_scales", "xla")])
def test_config_rejects_bad_field_naming_it(field, value):
    tiles = dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    fused_only = field in ("outlier_mode", "split_partials", "row_scales")
    with pytest.raises(InvalidConfigError, match=field):
        configs.FusedConfig(**{**tiles, field: value})
    with pytest.raises(TypeError if fused_only else InvalidConfigError, match=field):
        gemm_config(**{field: value})  # the GEMM kernel's config has no fused-only fields
    with pytest.raises(InvalidConfigError, match=field):  # a table entry's fields, on any route
        configs.route_config("pallas", {**tiles, field: value})


def test_each_route_takes_its_own_kernel_config():
    """A plan's gemm is the config of the kernel its route runs; route_config maps a table entry's
    fields (or another route's config) onto it, dropping what that kernel does not read."""
    fields = dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2, weight_layout="nk",
                  outlier_mode="dense", row_scales="input", split_reduce="consumer")
    fused = configs.route_config("fused", fields)
    assert type(fused) is configs.FusedConfig
    assert (fused.outlier_mode, fused.row_scales, fused.split_partials) == ("dense", "input", True)
    gemm = configs.route_config("xla_gemm", fused)
    assert gemm == configs.GemmConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2,
                                      weight_layout="nk")
    assert configs.route_config("fused", gemm) == dataclasses.replace(
        fused, outlier_mode="branch", row_scales="kernel", split_partials=False)
    with pytest.raises(InvalidConfigError, match="FusedConfig"):
        configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm, gemm_path="fused")
    with pytest.raises(InvalidConfigError, match="GemmConfig"):
        configs.KernelPlan(quantize=SMALL_QUANT, gemm=fused, gemm_path="pallas")
    with pytest.raises(InvalidConfigError, match="gemm_path"):
        configs.route_config("xla", fields)


def test_plan_rejects_unknown_path_and_transposing_into_kn():
    with pytest.raises(InvalidConfigError, match="gemm_path"):
        configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(), gemm_path="xla")
    with pytest.raises(InvalidConfigError, match="split_k"):
        configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(split_k=2), gemm_path="xla_gemm")
    with pytest.raises(InvalidConfigError, match="transpose_weight"):
        configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(), transpose_weight=True)


def test_tuned_tables_load_and_unknown_gpus_get_the_default_plan():
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "Tesla T4"):
        for layout in ("kn", "nk"):
            for m in (1, 16, 33, 64, 65, 256, 4096):
                plan = configs.plan_for(kind, m, 8192, 28672, weight_layout=layout)
                assert plan.reads_layout() == layout
                # One launch for skinny M, and the fused kernel's block holds all M rows.
                assert (plan.gemm_path == "fused") == (m <= configs.FUSED_MAX_M)
                if plan.gemm_path == "fused":
                    assert m <= plan.gemm.block_m
    assert configs.plan_for("Tesla T4", 3, 64, 64) == configs.default_plan(3, 64, 64)
    # Too few output tiles: the fused kernel narrows its tiles to 64 columns, then splits K;
    # so does the GEMM route (N=512 gives 4 tiles of 128 columns at M=64).
    h100 = "NVIDIA H100 80GB HBM3"
    fused = configs.plan_for(h100, 1, 4096, 1024, "nk").gemm
    assert fused.block_n == 64 and fused.split_k > 1
    assert configs.plan_for(h100, 64, 4096, 512, "nk").gemm.split_k > 1
    # Per-shape entries hold only inside [min_m, max_m]; the XLA-GEMM route never splits K.
    paths = {m: configs.plan_for(h100, m, 8192, 28672, "nk") for m in (16, 64, 65, 256, 4096)}
    assert [paths[m].gemm_path for m in (16, 64, 65, 256, 4096)] == [
        "fused", "pallas", "xla_gemm", "xla_gemm", "xla_gemm"]
    assert all(p.gemm.split_k == 1 for p in paths.values() if p.gemm_path == "xla_gemm")


@pytest.mark.parametrize("route", ["xla", "fused", "pallas"])
def test_outlier_count_compares_the_threshold_in_float32(route):
    """A 16-bit x just below a threshold that its dtype cannot hold (5.28125 < 5.29, which
    bfloat16 rounds down to 5.28125) is not an outlier: the stats agree with the recipe's
    float32 comparison (they compared in bfloat16 on the fused route and counted it)."""
    x = jnp.asarray([[5.28125, 1.0, -7.0, 0.5]] * 2, jnp.bfloat16)
    wq, col_scales = jnp.ones((8, 4), jnp.int8), jnp.ones((8,), jnp.float32)
    _, _, col_mask = reference.quantize_rows(x, 5.29)
    assert np.asarray(col_mask).tolist() == [False, False, True, False]
    assert np.asarray(reference.outlier_column_mask(x, 5.29)).tolist() == [False, False, True, False]
    if route == "xla":
        _, stats = reference.int8_matmul_reference(x, wq, col_scales, threshold=5.29,
                                                   outlier_capacity=4, weight_layout="nk")
    else:
        plan = fused_plan(2) if route == "fused" else PLANS["nk"]
        _, stats = int8_matmul_pallas(x, wq, col_scales, threshold=5.29, outlier_capacity=4,
                                      weight_layout="nk", plan=plan, interpret=True)
    assert int(stats.num_outlier_columns) == 1


@pytest.mark.parametrize("m,k,n,split_k,norm", [
    (1, 200, 45, 3, False),  # decode row, ragged last K step and tile
    (1, 96, 64, 4, True),    # the q|k|v projection as the models run it: its RMSNorm folded in
    (5, 128, 33, 2, False),
])
def test_consumer_split_partials_sum_to_the_op_result(rng, m, k, n, split_k, norm):
    """A plan with split_partials: asked for them, the fused kernel's float32 partials come
    back unsummed, and their sum cast to the output dtype is the op's result bit for bit; without
    it (or on a plan that sums itself) the op returns its result ([1, M, N] when asked)."""
    x, wq, col_scales, b = _inputs(rng, m, k, n, jnp.bfloat16, 2, True)
    rms = reference.InputNorm(jnp.asarray(rng.uniform(0.5, 2, k), jnp.bfloat16), 1e-6) if norm else None
    consumer, summing = (fused_plan(m, split_k=split_k, split_partials=p) for p in (True, False))
    run = lambda plan, **kw: int8_matmul_pallas(  # noqa: E731
        x, _weight_for(plan, wq), col_scales, b, threshold=THRESHOLD, outlier_capacity=4,
        weight_layout="nk", norm=rms, plan=plan, interpret=True, **kw)[0]
    y = run(summing)
    partials = run(consumer, split_partials=True)
    assert partials.shape == (split_k, m, n) and partials.dtype == jnp.float32
    msg = f"seed {rng.seed_value}"
    np.testing.assert_array_equal(np.asarray(partials.sum(0).astype(y.dtype), np.float32),
                                  np.asarray(y, np.float32), err_msg=msg)
    np.testing.assert_array_equal(np.asarray(run(consumer), np.float32), np.asarray(y, np.float32),
                                  err_msg=msg)
    whole = run(summing, split_partials=True)
    assert whole.shape == (1, m, n) and whole.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(whole[0], np.float32), np.asarray(y, np.float32), err_msg=msg)


@pytest.mark.parametrize("m,k,n,flagged,layout", [
    (70, 129, 300, 5, "nk"),    # 3 row programs, 2 weight programs, odd K
    (3, 200, 33, 12, "kn"),
    (1, 77, 45, 0, "nk"),       # no outlier column
    (40, 300, 513, 70, "nk"),   # two slot chunks gathered (G = 128), the last one zero-padded
    (5, 64, 40, 3, "kn"),       # column 0 flagged: the dead slots' index is a live column
    (3, 200, 33, 150, "kn"),    # more than G = 64: nothing gathered, xq zeroed on all 150
    (4, 256, 40, 256, "nk"),    # every column flagged
])
def test_outlier_operands_equal_reference(rng, m, k, n, flagged, layout):
    """The outlier column list, xq with every outlier column zeroed, the count and the dense
    flag, and (when the count fits G) the compacted x and weight operands up to the last
    written chunk, bit for bit as the XLA formulation (jnp.nonzero, take) gives them."""
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    xq = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
    wq = jnp.asarray(rng.integers(-127, 128, (n, k) if layout == "nk" else (k, n), dtype=np.int8))
    flags = np.zeros(k, np.int32)
    # Column 0 only where a case asks for it (or all K are flagged).
    columns = rng.choice(np.arange(0 if flagged == k else 1, k), flagged, replace=False)
    if (m, k) == (5, 64):
        columns[0] = 0
    flags[columns] = rng.integers(1, 3, flagged)  # any nonzero flag marks a column
    g = gather_slots(k)
    got = outlier_operands(x, xq, wq, jnp.asarray(flags), gather_slots=g, weight_layout=layout,
                           interpret=True)
    want = outlier_operands_reference(x, xq, wq, jnp.asarray(flags), gather_slots=g,
                                      weight_layout=layout)
    msg = f"seed {rng.seed_value}"
    assert int(got.count[0]) == flagged and int(got.dense[0]) == int(flagged > g)
    for name in ("xq", "count", "dense"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)),
                                      np.asarray(getattr(want, name)), err_msg=f"{name}, {msg}")
    np.testing.assert_array_equal(np.asarray(got.slots)[:flagged], np.sort(columns), err_msg=msg)
    assert np.all(np.asarray(got.xq)[:, columns] == 0)
    if flagged <= g:  # the chunks the kernel wrote: zero-padded past the count
        written = -(-flagged // SLOT_BLOCK) * SLOT_BLOCK
        np.testing.assert_array_equal(np.asarray(got.x_o)[:, :written],
                                      np.asarray(want.x_o)[:, :written], err_msg=f"x_o, {msg}")
        w_o, w_want = (np.asarray(a) if layout == "nk" else np.asarray(a).T
                       for a in (got.w_o, want.w_o))
        np.testing.assert_array_equal(w_o[:, :written], w_want[:, :written],
                                      err_msg=f"w_o, {msg}")


def test_outlier_operands_names_the_disagreeing_shapes():
    x, xq = jnp.zeros((4, 64), jnp.bfloat16), jnp.zeros((4, 64), jnp.int8)
    with pytest.raises(ValueError, match=r"wq \(40, 63\).*do not agree on K=64"):
        outlier_operands(x, xq, jnp.zeros((40, 63), jnp.int8), jnp.zeros((64,), jnp.int32),
                         gather_slots=64, weight_layout="nk", interpret=True)
    with pytest.raises(ValueError, match="gather_slots=48"):
        outlier_operands(x, xq, jnp.zeros((40, 64), jnp.int8), jnp.zeros((64,), jnp.int32),
                         gather_slots=48, weight_layout="nk", interpret=True)


@pytest.mark.parametrize("plan_name", ["nk", "nk_xla_gemm"])
def test_changing_outlier_count_needs_no_recompilation_and_stays_exact(rng, plan_name):
    """One compiled op takes batches with 0, a few, a gathered many, more than G and all K
    outlier columns: it traces once, its int32 accumulator equals the reference's bit for bit
    and its output stays within the derived bound at every count."""
    m, k, n = 33, 256, 48  # G = 64 of K = 256
    plan = PLANS[plan_name]
    traces = []

    def op(x, wq, col_scales):
        traces.append(x.shape)
        acc = int8_accumulator_pallas(x, wq, threshold=THRESHOLD, plan=plan, interpret=True)
        y, stats = int8_matmul_pallas(x, wq, col_scales, threshold=THRESHOLD,
                                      outlier_capacity=4, weight_layout="nk", plan=plan,
                                      interpret=True)
        return acc, y, stats.num_outlier_columns

    compiled = jax.jit(op)
    for outlier_cols in (0, 5, 64, 65, 200, k):
        x, wq, col_scales, _ = _inputs(rng, m, k, n, jnp.bfloat16, outlier_cols)
        acc, y, count = compiled(x, wq.T, col_scales)
        msg = f"{outlier_cols} outlier columns, seed {rng.seed_value}"
        want = reference.int8_dot(reference.quantize_rows(x, THRESHOLD)[0], wq)
        np.testing.assert_array_equal(np.asarray(acc), np.asarray(want), err_msg=msg)
        assert int(count) == outlier_cols, msg
        y64, magnitude = checks.float64_recipe(x, wq, col_scales, None, threshold=THRESHOLD)
        ratio = checks.max_bound_violation(
            y, y64, magnitude, jnp.bfloat16, stream_terms=outlier_cols + k // SLOT_BLOCK + 2,
            split_k=plan.gemm.split_k,
            weight_rounding=checks.weight_rounding(x, wq, col_scales, threshold=THRESHOLD))
        assert ratio <= 1.0, f"error {ratio:.3g} x the bound, {msg}"
    assert len(traces) == 1
