"""The engine's one compiled program: a forward pass over the paged cache and a per-row token choice.

Every call has the same arguments whatever it is for: a decode step is [B, 1] (one token for each
running sequence, rows past the running count padded), a prefill call is [P, T]: a chunk of P
prompts, each row left-padded so that its last real token is the last column and one position
of logits is all the head computes. Padding tokens have position -1: they write to the scratch
block and see nothing. The compiled shapes are therefore the batch buckets x 1 plus the
engine's prefill shapes (row bucket x chunk bucket within its token budget), no more.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jint8.generation.sampling import SamplingParams, filter_logits
from jint8.generation.state import _apply
from jint8.models.common import PagedKVCache


@struct.dataclass
class RowSampling:
    """Per-row sampling controls [B]: temperature 0 is greedy; seed and counter key the row's draw
    (the counter is the number of tokens it generated so far, so a seeded request draws the same
    tokens whatever rows it shares a step with)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    counter: jax.Array


def _sample_row(logits, temperature, top_k, top_p, seed, counter):
    key = jax.random.fold_in(jax.random.key(seed), counter)
    sampling = SamplingParams(temperature=jnp.where(temperature > 0, temperature, 1.0), top_k=top_k, top_p=top_p)
    sampled = jax.random.categorical(key, filter_logits(logits, sampling), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def choose_row_tokens(logits: jax.Array, sampling: RowSampling) -> jax.Array:
    """logits [B, V] -> tokens [B] int32; an all-greedy batch skips the vocabulary sort of top-k/p."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        return jax.vmap(_sample_row)(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                     sampling.seed, sampling.counter)

    return jax.lax.cond(jnp.any(sampling.temperature > 0), sample, lambda _: greedy, None)


def build_step(model, on_trace: Callable[[tuple], None]):
    """The jitted step(params, k_pool, v_pool, input_ids [B, T], positions [B, T], block_tables [B, M],
    sampling) -> (tokens [B], k_pool, v_pool), the pools donated (updated in place).
    on_trace(shape) runs once per compilation, which is how the engine counts them."""

    def step(params, k_pool, v_pool, input_ids, positions, block_tables, sampling: RowSampling):
        on_trace(tuple(input_ids.shape))
        cache = PagedKVCache(k_pool, v_pool, block_tables, positions)
        logits, cache = _apply(model, params, input_ids, jnp.maximum(positions, 0), cache, None, None,
                               last_logits_only=True)
        return choose_row_tokens(logits[:, -1], sampling), cache.k, cache.v

    return jax.jit(step, donate_argnums=(1, 2))


@functools.lru_cache(maxsize=None)
def default_buckets(largest: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from `smallest` up to and including `largest` (which need not be one)."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= 2
    return tuple(buckets + [largest])


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (buckets sorted ascending, n <= the largest)."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} is larger than the largest bucket {buckets[-1]}")
