"""The many-outlier GEMMs (jint8/ops/int8_matmul/partitioned.py) inside the two-kernel routes.

With a small Policy every bucket kind runs on small shapes: the kernels' route up to a few
outlier columns, then "gather" and "partition" buckets, chosen per call by the device count.
Held to the same truths as the kernels (tests/ops/test_int8_matmul_pallas.py): the int32
accumulator equal to reference.int8_dot exactly in every bucket, the output within the derived
float bound of the float64 recipe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.ops.int8_matmul import checks, reference
from jint8.ops.int8_matmul.partitioned import ENV_VAR, Policy, bucket_index, buckets, default_policy
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas
from jint8.ops.int8_matmul.testing import int8_accumulator_pallas
from jint8.ops.int8_matmul.pallas_triton.outliers import SLOT_BLOCK
from int8_plans import PLANS, THRESHOLD
from test_int8_matmul_pallas import _inputs, _weight_for

# K = 64: kernels up to 4 columns, gather 16 and 32, partition 48 and 64.
SMALL = Policy(min_m=1, kernel_max_count=4, base_width=8)


@pytest.mark.parametrize("k", [64, 100, 1024, 4096, 8192, 14336, 28672])
def test_buckets_cover_every_count_with_wide_enough_operands(k):
    table = buckets(k)
    assert table[0].kind == "kernels" and table[-1].max_count == k
    previous = 0
    for b in table:
        assert b.max_count > previous
        if b.kind != "kernels":
            assert b.max_count <= b.outlier_width <= k  # every outlier column of the bucket fits
        if b.kind == "partition":  # and every non-outlier column the bucket can have
            assert k - previous <= b.inlier_width <= k
        previous = b.max_count
    for c in sorted({0, 1, table[0].max_count, min(k, table[0].max_count + 1), k // 2, k}):
        want = next(i for i, b in enumerate(table) if c <= b.max_count)
        assert int(bucket_index(jnp.int32(c), table)) == want, c


# One count per bucket of buckets(64, SMALL): kernels, gather 16, gather 32, partition 48, 64.
COUNTS = [3, 10, 30, 40, 64]


@pytest.mark.parametrize("plan_name", ["nk", "kn"])
def test_accumulator_is_exact_in_every_bucket(rng, plan_name):
    plan = PLANS[plan_name]
    table = buckets(64, kernel_max_count=SMALL.kernel_max_count, base_width=SMALL.base_width)
    assert [int(bucket_index(jnp.int32(c), table)) for c in COUNTS] == [0, 1, 2, 3, 4]
    for count in COUNTS:
        x, wq, _, _ = _inputs(rng, 9, 64, 24, jnp.bfloat16, count)
        acc = int8_accumulator_pallas(x, _weight_for(plan, wq), threshold=THRESHOLD, plan=plan,
                                      interpret=True, partition=SMALL)
        want = reference.int8_dot(reference.quantize_rows(x, THRESHOLD)[0], wq)
        np.testing.assert_array_equal(np.asarray(acc), np.asarray(want),
                                      err_msg=f"{count} outlier columns, seed {rng.seed_value}")


@pytest.mark.parametrize("dtype,bias,plan_name", [
    (jnp.bfloat16, True, "nk"),
    (jnp.float16, False, "nk_xla_gemm"),
    (jnp.float32, True, "kn"),
])
def test_output_within_derived_bound_in_every_bucket(rng, dtype, bias, plan_name):
    plan = PLANS[plan_name]
    run = jax.jit(lambda x, w, s, b: int8_matmul_pallas(
        x, w, s, b, threshold=THRESHOLD, outlier_capacity=4, weight_layout=plan.reads_layout(),
        plan=plan, interpret=True, partition=SMALL))
    for count in COUNTS:
        x, wq, col_scales, b = _inputs(rng, 9, 64, 24, dtype, count, bias)
        y, stats = run(x, _weight_for(plan, wq), col_scales, b)
        assert y.dtype == dtype and y.shape == (9, 24)
        assert int(stats.num_outlier_columns) == count and not bool(stats.capacity_overflow)
        y64, magnitude = checks.float64_recipe(x, wq, col_scales, b, threshold=THRESHOLD)
        stream_terms = count + -(-64 // SLOT_BLOCK) + 2
        rounding = checks.weight_rounding(x, wq, col_scales, threshold=THRESHOLD)
        ratio = checks.max_bound_violation(y, y64, magnitude, dtype, stream_terms=stream_terms,
                                           weight_rounding=rounding)
        assert ratio <= 1.0, f"{count} columns: error {ratio:.3g} x the bound, seed {rng.seed_value}"
    # One compiled program served every bucket: the count is read on the device.
    assert run._cache_size() == 1


def test_the_gemms_are_opt_in_through_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_policy() is None
    monkeypatch.setenv(ENV_VAR, "0")
    assert default_policy() is None
    monkeypatch.setenv(ENV_VAR, "1")
    assert default_policy() == Policy()
