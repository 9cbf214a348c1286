"""Decode attention over a static KV cache: the Pallas kernel on one NVIDIA GPU.

Callers ask unsupported_reason first and keep their XLA attention where it gives a reason;
JINT8_BACKEND=xla (the int8 op's switch) turns the kernel off too."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jint8.errors import ShapeError
from jint8.ops.attention.paged import paged_attention_reference, paged_write, pool_storage_dtype
from jint8.ops.attention.reference import decode_attention_reference, decode_step_reference, rotate
from jint8.ops._platform import BACKEND_ENV_VAR, requested_backend, triton_gpu_unsupported_reason


def unsupported_reason(q: jax.Array, k_cache: jax.Array) -> Optional[str]:
    """None when decode_attention_step's kernel runs q [B, N, H] over k_cache [L, B, S, K, H]
    (or paged_attention's over a pool [L, P, Z, K, H]: the kv heads sit on the same axis)."""
    if requested_backend() == "xla":
        return f"{BACKEND_ENV_VAR}=xla"
    reason = triton_gpu_unsupported_reason()
    if reason is not None:
        return reason
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} attention keeps XLA's full-precision dots (the kernel is for 16-bit)"
    h, groups = q.shape[-1], q.shape[-2] // k_cache.shape[3]
    if h < 16 or h & (h - 1):
        return f"head_dim {h} is not a power of two >= 16"
    if groups > 64:
        return f"{groups} query heads per kv head (at most 64)"
    if len(jax.devices()) > 1:
        return "more than one device (the kernel is not partitioned over a mesh)"
    return None


def decode_attention_step(q, k, v, k_cache, v_cache, valid, cache_index, *, layer: int, scale: float,
                          rope=None, packed=None, interpret: bool = False):
    """One decode step's attention in the Pallas kernel (callers check unsupported_reason first).

    q [B, N, H] and k, v [B, K, H] are the step's projections, before RoPE when rope = (cos, sin)
    [B, H] is given: the kernel rotates q and k, writes k and v at slot cache_index of cache layer
    `layer` (k_cache, v_cache [L, B, S, K, H], in place under jit) and attends over the slots with
    valid [B, S]. packed: the [B, (N + 2K) * H] array that q, k, v were split from, in that order
    (a fused q|k|v projection): the kernel reads them from it, so XLA copies no slices out; or
    that projection's split-K partials [P, B, (N + 2K) * H] (Int8Dense(split_partials=True)),
    which the kernel adds in float32 where it reads them and rounds to q's dtype.
    Returns (out [B, N, H], k_cache, v_cache).
    """
    from jint8.ops.attention.pallas_triton import Columns, decode_attention_pallas

    b, n, h = q.shape
    width = (n + 2 * k.shape[1]) * h
    if packed is not None and (packed.ndim not in (2, 3) or packed.shape[-2:] != (b, width)):
        raise ShapeError(f"decode_attention_step: packed.shape={packed.shape} must be [B, (N + 2K) * H] "
                         f"= {(b, width)} or [P, B, (N + 2K) * H] (split-K partials)")
    if packed is not None and packed.ndim == 3 and packed.shape[0] == 1:
        packed = packed[0]  # one "partial": the array itself (the kernel's plain loads)
    if packed is not None:
        sources = (packed,) * 3
        columns = Columns(q=0, k=n * h, v=n * h + k.shape[1] * h)
    else:
        sources, columns = (q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)), Columns()
    cos, sin = rope if rope is not None else (None, None)
    return decode_attention_pallas(*sources, k_cache, v_cache, valid, cache_index, cos, sin,
                                   columns=columns, num_heads=n, layer=layer, scale=scale,
                                   dtype=q.dtype, interpret=interpret)


def paged_attention(q, k_pool, v_pool, block_tables, positions, *, layer: int, scale: float,
                    sliding_window=None, logit_softcap=None, dtype=None):
    """Attention of q [B, T, N, H] over a paged cache (paged.py states the layout).

    The one entry point the models call. Decode (T = 1) runs the paged Pallas kernel where
    unsupported_reason gives none; prefill chunks and everything else the plain-jnp gather, the
    truth the kernel is held to. dtype: the cached values' dtype when the pools hold their bits
    (pool_storage_dtype; the CPU's way, so the kernel never sees such pools)."""
    holds_bits = dtype is not None and jnp.dtype(dtype) != k_pool.dtype
    if q.shape[1] == 1 and not holds_bits and unsupported_reason(q, k_pool) is None:
        from jint8.ops.attention.paged_pallas import paged_decode_attention_pallas

        out = paged_decode_attention_pallas(q[:, 0], k_pool, v_pool, block_tables, positions[:, 0],
                                            layer=layer, scale=scale, sliding_window=sliding_window,
                                            logit_softcap=logit_softcap)
        return out[:, None]
    return paged_attention_reference(q, k_pool, v_pool, block_tables, positions, layer=layer, scale=scale,
                                     sliding_window=sliding_window, logit_softcap=logit_softcap, dtype=dtype)


__all__ = ["decode_attention_reference", "decode_attention_step", "decode_step_reference", "paged_attention",
           "paged_attention_reference", "paged_write", "pool_storage_dtype", "rotate", "unsupported_reason"]
