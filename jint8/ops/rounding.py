"""Rounding to a 16-bit float inside Pallas kernels, the same on the GPU and in interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_to(value: jax.Array, dtype, *, interpret: bool) -> jax.Array:
    """value (float32) rounded to dtype (round to nearest even).

    Interpret mode runs a kernel body through XLA:CPU, whose excess-precision rule may drop a
    float32 -> 16-bit -> float32 round trip: there reduce_precision rounds explicitly first
    (Triton keeps every cast, and has no such op).
    """
    if interpret:
        finfo = jnp.finfo(dtype)
        value = jax.lax.reduce_precision(value, finfo.nexp, finfo.nmant)
    return value.astype(dtype)
