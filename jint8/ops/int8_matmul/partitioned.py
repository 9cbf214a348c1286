"""Many outlier columns at large M: XLA GEMMs on operands split by the batch's outlier columns.

The two-kernel routes (pallas_triton) stream a batch's outlier columns through a Triton 16-bit
MMA after an int8 GEMM over all of K. Past a few hundred outlier columns at M >= 256 that costs
up to 4-14x bf16 (RESULTS.md, the outlier sweep): the gather of the weight's outlier columns
reads single bytes across the K-major rows, the Triton stream runs well below cuBLAS's bf16
rate, and past K/4 the int8 GEMM still runs over every (zeroed) outlier column. Here the same
recipe runs as cuBLAS GEMMs on operands cut at the batch's outlier columns O (|O| = c):

- "gather" (c up to K/2): acc = xq[:, not O] @ wq over all of K (xq's columns in O zeroed, as
  in the kernels), and the outlier stream x[:, O] @ wq[O, :] over the columns of O gathered
  into a static width W >= c (zero past c), as one 16-bit GEMM;
- "partition" (c past K/2): the int8 GEMM too runs only over the gathered non-outlier columns
  (a static width >= K - c), so each input feature goes through exactly one of the two GEMMs.

Static widths need a branch per width: one lax.switch on the device count picks the smallest
bucket that holds the batch (widths double from 512 up to K/2, then eighths of K), and bucket
0 is the kernels' own route, which stays the fastest up to `kernel_max_count` columns. Every
branch computes reference.py's recipe with the kernels' roundings: the exact int32 accumulator
of xq's non-outlier columns (bit-identical in every branch), and the stream multiplying x by
the int8 weight values (exact in x's 16-bit dtype, each product exact in float32) with the
weight scale s_w / 127 applied per output column after the float32-accumulated GEMM
(checks.weight_rounding bounds the recipe's skipped weight rounding); the epilogue's order is
dequantize()'s: acc * (s_x s_w) / 127^2, + bias, + stream.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jint8.ops.int8_matmul.reference import INV_127, INV_127_SQ, int8_dot

# From this many rows on, the two-kernel routes switch to these GEMMs past KERNEL_MAX_COUNT.
MIN_M = 256
# Up to this many outlier columns the kernels' own route (bucket 0) is kept: its gathered
# stream costs little there and it runs no extra GEMM launch.
KERNEL_MAX_COUNT = 256
# The narrowest gathered width (columns); wider buckets double it.
BASE_WIDTH = 512
# Past K/2 the partition buckets step by K / PARTITION_STEPS.
PARTITION_STEPS = 8
_ALIGN = 16  # widths are multiples of a 16-bit MMA's K step


def _round_up(v: int, to: int) -> int:
    return -(-v // to) * to


class Policy(NamedTuple):
    """When the two-kernel routes use these GEMMs (a static, hashable argument of the op).

    min_m: from this many rows on; kernel_max_count: up to this many outlier columns the
    kernels' route (bucket 0) runs; base_width: the narrowest gathered width."""

    min_m: int = MIN_M
    kernel_max_count: int = KERNEL_MAX_COUNT
    base_width: int = BASE_WIDTH


class Bucket(NamedTuple):
    """Batches with max_count >= c > the previous bucket's max_count run this way."""

    kind: str  # "kernels", "gather" or "partition"
    max_count: int
    outlier_width: int  # gathered outlier columns (0 for "kernels")
    inlier_width: int  # gathered non-outlier columns ("partition" only; else 0)


def buckets(k: int, *, kernel_max_count: int = KERNEL_MAX_COUNT,
            base_width: int = BASE_WIDTH) -> tuple[Bucket, ...]:
    """The static buckets for K input features, by increasing max_count; the last holds c = K.

    Gathered widths double from min(base_width, K / 8) while below K / 2, then K / 2; past K / 2
    the partition buckets step by K / PARTITION_STEPS, each gathering the outliers up to its
    max_count and the non-outliers that the previous bucket's max_count leaves."""
    first = max(_ALIGN, _round_up(min(base_width, k // 8), _ALIGN))
    kernel_max_count = min(kernel_max_count, k)
    out = [Bucket("kernels", kernel_max_count, 0, 0)]
    half = min(k, _round_up(k // 2, _ALIGN))
    width = first
    while width < half:
        if width > out[-1].max_count:
            out.append(Bucket("gather", width, width, 0))
        width *= 2
    if half > out[-1].max_count:
        out.append(Bucket("gather", half, half, 0))
    step = max(_ALIGN, _round_up(-(-k // PARTITION_STEPS), _ALIGN))
    while out[-1].max_count < k:
        low = out[-1].max_count
        high = min(k, low + step)
        out.append(Bucket("partition", high, high, min(k, _round_up(k - low, _ALIGN))))
    return tuple(out)


def bucket_index(count: jax.Array, table: Sequence[Bucket]) -> jax.Array:
    """The bucket of a batch with `count` outlier columns (int32 scalar on the device)."""
    edges = jnp.asarray([b.max_count for b in table[:-1]], jnp.int32)
    return jnp.sum(count > edges, dtype=jnp.int32)


def _columns(mask: jax.Array, width: int):
    """The first `width` indices where mask holds, ascending (0 past them), and which are live."""
    (indices,) = jnp.nonzero(mask, size=width, fill_value=0)
    live = jnp.arange(width) < jnp.sum(mask, dtype=jnp.int32)
    return indices.astype(jnp.int32), live


def _take_k(a: jax.Array, indices: jax.Array, axis_k: int) -> jax.Array:
    return jnp.take(a, indices, axis=axis_k, mode="clip")


def _stream(x_o, w_o, weight_layout: str, *, upcast: bool):
    """x_o [M, W] @ w_o (int8 [W, N] "kn" or [N, W] "nk") in float32, the weight as x's dtype
    (int8 values are exact in every float dtype). upcast: float32 operands (XLA:CPU has no
    16-bit dot with a float32 result; the products are exact either way)."""
    w_o = w_o.astype(jnp.float32 if upcast else x_o.dtype)
    if upcast:
        x_o = x_o.astype(jnp.float32)
    contract = 0 if weight_layout == "kn" else 1
    precision = jax.lax.Precision.HIGHEST if x_o.dtype == jnp.float32 else None
    return jax.lax.dot_general(x_o, w_o, (((1,), (contract,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def gemm_branch(bucket: Bucket, *, weight_layout: str, out_dtype, has_bias: bool,
                accumulator_only: bool, upcast: bool) -> Callable:
    """The branch of one "gather" or "partition" bucket:
    (x, xq, wq, row_scales, col_scales, bias, col_flags) -> [M, N] out_dtype (int32 with
    accumulator_only: xq[:, not O] @ wq exactly). xq: the activation pass's, outlier columns
    not yet zeroed; col_flags [K] int32, nonzero on O."""
    axis_k = 0 if weight_layout == "kn" else 1

    def branch(x, xq, wq, row_scales, col_scales, bias, col_flags):
        mask = col_flags > 0
        if bucket.kind == "partition":
            inliers, live_in = _columns(~mask, bucket.inlier_width)
            xq_in = jnp.where(live_in[None, :], _take_k(xq, inliers, 1), jnp.int8(0))
            acc = int8_dot(xq_in, _take_k(wq, inliers, axis_k), weight_layout)
        else:
            acc = int8_dot(jnp.where(mask[None, :], jnp.int8(0), xq), wq, weight_layout)
        if accumulator_only:
            return acc
        outliers, live = _columns(mask, bucket.outlier_width)
        x_o = jnp.where(live[None, :], _take_k(x, outliers, 1), 0).astype(x.dtype)
        stream = _stream(x_o, _take_k(wq, outliers, axis_k), weight_layout, upcast=upcast)
        y = acc.astype(jnp.float32) * (row_scales[:, None] * col_scales[None, :]) * INV_127_SQ
        if has_bias:
            y = y + bias.astype(jnp.float32)[None, :]
        y = y + stream * (col_scales * INV_127)[None, :]
        return y.astype(out_dtype)

    return branch
