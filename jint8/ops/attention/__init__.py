"""Decode attention over a static KV cache: the Pallas kernel on one NVIDIA GPU.

Callers ask unsupported_reason first and keep their XLA attention where it gives a reason;
JINT8_BACKEND=xla (the int8 op's switch) turns the kernel off too."""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

from jint8.ops.attention.reference import decode_attention_reference
from jint8.ops.int8_matmul.api import BACKEND_ENV_VAR


def unsupported_reason(q: jax.Array, k_cache: jax.Array) -> Optional[str]:
    """None when decode_attention's kernel runs q [B, N, H] over k_cache [L, B, S, K, H]."""
    from jint8.ops.int8_matmul.pallas_triton import unsupported_reason as gpu_reason

    if os.environ.get(BACKEND_ENV_VAR) == "xla":
        return f"{BACKEND_ENV_VAR}=xla"
    reason = gpu_reason(q, k_cache)
    if reason is not None:
        return reason
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} attention keeps XLA's full-precision dots (the kernel is for 16-bit)"
    h, groups = q.shape[-1], q.shape[1] // k_cache.shape[3]
    if h < 16 or h & (h - 1):
        return f"head_dim {h} is not a power of two >= 16"
    if groups > 64:
        return f"{groups} query heads per kv head (at most 64)"
    if len(jax.devices()) > 1:
        return "more than one device (the kernel is not partitioned over a mesh)"
    return None


def decode_attention(q, k_cache, v_cache, valid, num_slots, *, layer: int, scale: float):
    """[B, N, H] attention of one query token per sequence over cache layer `layer` (see
    pallas_triton.decode_attention_pallas); callers check unsupported_reason first."""
    from jint8.ops.attention.pallas_triton import decode_attention_pallas

    return decode_attention_pallas(q, k_cache, v_cache, valid, num_slots, layer=layer, scale=scale)


__all__ = ["decode_attention", "decode_attention_reference", "unsupported_reason"]
