"""The grouped program order both matmul families' GEMM kernels walk their output tiles in.
Imports nothing from the ops, so each op depends on this module rather than on another op."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

GROUP_M = 8  # M tiles walked together so their weight tiles stay in L2 (prefill)


def grouped_tile(m: int, n: int, block_m: int, block_n: int, group_m: int = GROUP_M):
    """(pid_m, pid_n) of this program over a 1-D grid of cdiv(m, block_m) * cdiv(n, block_n)
    output tiles: group_m M tiles at a time sweep every N tile, so a group's programs share the
    weight tiles they read; one M tile (decode) walks N in order."""
    num_pid_m, num_pid_n = pl.cdiv(m, block_m), pl.cdiv(n, block_n)
    pid = pl.program_id(0)
    if num_pid_m == 1:
        return 0, pid
    group_size = group_m * num_pid_n
    first_m = (pid // group_size) * group_m
    rows_in_group = jnp.minimum(num_pid_m - first_m, group_m)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group
