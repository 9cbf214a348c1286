"""Rounding float32 to a 16-bit float that no compiler drops: in Pallas kernels (the same on the GPU
and in interpret mode) and in the XLA references that define the kernels' roundings."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_to(value: jax.Array, dtype, *, explicit: bool) -> jax.Array:
    """value (float32) rounded to dtype (round to nearest even; float32 as it is).

    explicit: round with reduce_precision before the cast. XLA (interpret mode runs a kernel body
    through XLA:CPU; a jitted reference runs through XLA:GPU) may drop a float32 -> 16-bit ->
    float32 round trip under its excess-precision rule, but never a reduce_precision; Triton keeps
    every cast and has no such op, so kernels pass explicit=interpret. reduce_precision flushes
    what would be subnormal in dtype to zero, so those values (float16 below 2^-14) are rounded to
    a multiple of dtype's smallest subnormal instead, by adding and subtracting 1.5 * 2^23 of it.
    """
    finfo = jnp.finfo(dtype)
    if explicit and finfo.bits < 32:  # a float32 "rounding" is the identity: nothing to keep
        rounded = jax.lax.reduce_precision(value, finfo.nexp, finfo.nmant)
        magic = 1.5 * 2.0**23 * float(finfo.smallest_subnormal)
        if magic < 1.0:  # dtype's subnormals are normal float32 numbers (float16; not bfloat16)
            subnormal = (value + magic) - magic
            rounded = jnp.where(jnp.abs(value) < float(finfo.smallest_normal), subnormal, rounded)
        value = rounded
    return value.astype(dtype)
