"""Greedy and sampled token choice: temperature, top-k and top-p as traced values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jint8.generation.config import GenerationConfig


@struct.dataclass
class SamplingParams:
    """The traced sampling controls (scalars), so changing them reuses the compiled program."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def from_config(cls, config: GenerationConfig) -> "SamplingParams":
        return cls(
            temperature=jnp.float32(config.temperature if config.sampling else 1.0),
            top_k=jnp.int32(config.top_k),
            top_p=jnp.float32(config.top_p),
        )


def filter_logits(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
    """logits [..., V] float32 -> temperature-scaled logits with top-k/top-p losers at -inf.

    transformers' warper order: temperature, then top-k, then top-p on what top-k kept. Ties at
    the cut-off are kept (a value threshold rather than an index scatter).
    """
    logits = logits.astype(jnp.float32) / sampling.temperature
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(sampling.top_k, 1, vocab)
    kth = jax.lax.dynamic_index_in_dim(descending, k - 1, axis=-1, keepdims=True)
    kth = jnp.where(sampling.top_k > 0, kth, -jnp.inf)
    descending = jnp.where(descending < kth, -jnp.inf, descending)
    # top-p: keep a token while the mass strictly before it is < top_p (transformers removes the
    # ascending-cumsum <= 1 - top_p tail), so the most likely token always survives.
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < sampling.top_p, descending, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    cutoff = jnp.where(sampling.top_p < 1.0, jnp.maximum(cutoff, kth), kth)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def choose_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingParams, do_sample: bool) -> jax.Array:
    """logits [..., V] -> token ids [...] int32: argmax, or a sample of the filtered distribution."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
