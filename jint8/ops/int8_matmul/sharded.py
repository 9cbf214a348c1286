"""int8_matmul on sharded operands: each device runs the op on its own shard (shard_map), the
reductions a split K needs are XLA collectives, and LLM.int8()'s decisions are made as one device
would make them.

The rule (jint8's choice; tests/scripts/sharded_int8_ops.py holds it on 8 CPU devices):
- row scales: s_x[m] is row m's absmax over the whole K. A K-split (row-parallel) call
  all-reduces the per-shard row absmax (pmax, exact), so every shard quantizes its columns of
  row m with the same s_x[m].
- outlier columns: column k is an outlier when any row of the whole batch has |x| >= threshold.
  A batch split (M over a "data" axis) all-reduces the per-shard column flags (pmax). A K split
  needs nothing: each shard holds every row of its own columns.
- the int8 part: each K shard's int32 partial accumulator xq_shard @ wq_shard is all-reduced
  over the K axes (psum, exact in int32) and then dequantized as one device does it.
- the float32 outlier stream (x[:, O] @ dequant(wq[O])): on a K split each shard computes the
  terms of its own outlier columns and the partial products are all-reduced in float32. They are
  the same terms as one device's, grouped by shard: equal up to float32 reassociation.
- an RMSNorm or input gate over a split K, or an output gate over a split N: the shard
  all-gathers the operand, applies it whole, and keeps its own slice.
So a sharded call equals the unsharded one bit for bit, except on a K split with outlier
columns on more than one shard, where the outlier stream's float32 sum is regrouped (the int8
part, the row scales and the outlier set are still identical).

Where the local call already decides as one device (the whole K on every device, and the whole
batch or threshold 0: column-parallel layers at data=1) the chosen backend runs the shard as it
is: on a GPU each device runs the Pallas kernels on its own shard. Elsewhere (row-parallel
layers, or a batch split with outliers) the recipe runs from reference.py's functions with the
global row scales and column set, in XLA (on a GPU: XLA's int8 GEMM for xq @ wq): the Pallas
kernels compute their row scales and column flags themselves and take no given ones.

int8_matmul routes a call here by itself when its operands' types carry shardings over
Explicit mesh axes (jax.make_mesh's default). On Auto axes the types carry none:
int8_matmul(..., layout=layout_for(mesh, x_spec, w_spec)) runs this path with the layout given
(Int8Dense gives its own under jax.set_mesh: layers.tensor_parallel_layout). Without one XLA
partitions the XLA backend by itself (GSPMD: the reference is written over the whole arrays, so
the same decisions, with float32 sums regrouped where XLA splits them) and runs a kernel
backend's custom call replicated, which it cannot split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jint8.errors import ShapeError
from jint8.ops._sharding import Axes, MatmulLayout, layout_for, local_slice, spec_entry, typed_layout  # noqa: F401
from jint8.ops.int8_matmul import prologue, reference


def _global_recipe(x, wq, col_scales, bias, *, m: Axes, k: Axes, threshold, capacity, out_dtype, weight_layout):
    """reference.int8_matmul_reference on one shard, with the row scales and outlier columns of
    the whole call (the module docstring's rule). Returns (y, outlier count, overflow)."""
    xf = x.astype(jnp.float32)
    col_mask = reference.outlier_column_mask(xf, threshold)
    if m and threshold > 0:
        col_mask = jax.lax.pmax(col_mask.astype(jnp.int32), m) > 0
    row_scales = reference.row_absmax(xf, threshold)
    if k:
        row_scales = jax.lax.pmax(row_scales, k)
    acc = reference.int8_dot(reference.quantize_with(xf, row_scales, col_mask), wq, weight_layout)
    if k:
        acc = jax.lax.psum(acc, k)  # int32: exact in any order
    y = reference.dequantize_accumulator(acc, row_scales, col_scales, bias)
    count = jnp.sum(col_mask, dtype=jnp.int32)
    overflow = jnp.zeros((), bool)
    if threshold > 0:
        contribution, overflow = reference.outlier_stream(x, wq, col_scales, col_mask, capacity, weight_layout)
        if k:
            contribution = jax.lax.psum(contribution, k)
            count = jax.lax.psum(count, k)
        y = y + contribution
    return y.astype(out_dtype), count, overflow


def int8_matmul_sharded(x, wq, col_scales, bias, *, layout: MatmulLayout, impl, threshold: float,
                        outlier_capacity: int, out_dtype, weight_layout: str, norm=None, gate=None,
                        output_gate=None):
    """The op on a 2-D x [M, K] ([M, 2K] with a gate) split by `layout`; impl: the backend's
    Int8MatmulImpl, run on each shard where the local call decides as one device does.
    Returns (y [M, N] or [M, N / 2] with output_gate, Int8MatmulStats)."""
    m, k, n = layout.m, layout.k, layout.n
    k_total, n_total = wq.shape if weight_layout == "kn" else wq.shape[::-1]
    for name, extent, axes in (("M", x.shape[0], m), ("K", k_total, k), ("N", n_total, n)):
        if extent % layout.size(axes):
            raise ShapeError(f"int8_matmul: {name}={extent} does not split evenly over mesh axes {axes} "
                             f"(size {layout.size(axes)})")
    x_spec, w_spec, v_spec = layout.specs(weight_layout)
    gather_gate = output_gate is not None and bool(n)
    slice_gate = gather_gate and (n_total // 2) % layout.size(n) == 0
    y_spec = P(spec_entry(m), spec_entry(n) if output_gate is None or slice_gate else None)
    args = [x, wq, col_scales] + ([bias] if bias is not None else []) + ([norm] if norm is not None else [])
    specs = [x_spec, w_spec, v_spec] + ([v_spec] if bias is not None else []) + ([P()] if norm is not None else [])
    if layout.explicit:
        args = [jax.sharding.reshard(a, s) for a, s in zip(args, specs)]

    def body(x_l, wq_l, scales_l, *rest):
        rest = list(rest)
        bias_l = rest.pop(0) if bias is not None else None
        norm_l = rest.pop(0) if norm is not None else None
        gate_l = gate
        if k and (norm_l is not None or gate_l is not None):  # the prologue needs the whole row
            x_full = prologue.op_input(jax.lax.all_gather(x_l, k, axis=1, tiled=True), norm_l, gate_l)
            x_l, norm_l, gate_l = local_slice(x_full, k, layout.size(k)), None, None
        k_local = k_total // layout.size(k)
        local_gate = None if gather_gate else output_gate
        if not k and (not m or threshold == 0):  # the shard decides as one device: the backend runs it
            y, (count, overflow) = impl(
                x_l, wq_l, scales_l, bias_l, threshold=threshold, outlier_capacity=min(outlier_capacity, k_local),
                out_dtype=out_dtype, weight_layout=weight_layout, norm=norm_l, gate=gate_l, output_gate=local_gate)
        else:
            y, count, overflow = _global_recipe(
                prologue.op_input(x_l, norm_l, gate_l), wq_l, scales_l, bias_l, m=m, k=k, threshold=threshold,
                capacity=min(outlier_capacity, k_local), out_dtype=out_dtype, weight_layout=weight_layout)
            y = y if local_gate is None else local_gate(y)
        if gather_gate:  # gate | up lie on different devices: gate the whole row, keep this one's part
            y = output_gate(jax.lax.all_gather(y, n, axis=1, tiled=True))
            y = local_slice(y, n, layout.size(n)) if slice_gate else y
        every = m + k + n  # the same stats on every device
        if every:
            count = jax.lax.pmax(count, every)
            overflow = jax.lax.pmax(overflow.astype(jnp.int32), every) > 0
        return y, reference.Int8MatmulStats(count, overflow)

    run = jax.shard_map(body, mesh=layout.mesh, in_specs=tuple(specs), out_specs=(y_spec, P()), check_vma=False)
    return run(*args)
