"""The engine's compiled programs: a forward pass over the paged cache with a greedy token choice,
and a per-row sampler that replaces those tokens for calls with sampled rows.

Every call has the same arguments whatever it is for: a decode step is [B, 1] (one token for each
running sequence, rows past the running count padded), a prefill call is [P, T]: a chunk of P
prompts, each row left-padded so that its last real token is the last column and one position
of logits is all the head computes. Padding tokens have position -1: they write to the scratch
block and see nothing. The compiled shapes are therefore the batch buckets x 1 plus the
engine's prefill shapes (row bucket x chunk bucket within its token budget), no more; the
sampler's are the row counts of those shapes.
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
    """logits [B, V] -> tokens [B] int32: each row greedy (temperature 0) or drawn by its own key."""
    return jax.vmap(_sample_row)(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
                                 sampling.counter)


@struct.dataclass
class TokenSlots:
    """Where a call's rows take and leave tokens in the engine's device token buffer [S] (one
    entry per batch slot), so a decode step reads the previous step's tokens without a trip
    through the host. read [B]: the slot whose token is row b's input (-1: input_ids[b, -1], as
    prompts and padding rows are); write [B]: the slot row b's chosen token goes to (S, out of
    range: dropped, for padding rows)."""

    read: jax.Array
    write: jax.Array


def build_step(model, on_trace: Callable[[tuple], None], cache_dtype=None):
    """The jitted step(params, k_pool, v_pool, token_buffer [S], input_ids [B, T], positions [B, T],
    block_tables [B, M], slots: TokenSlots) -> (greedy tokens [B], logits [B, V], k_pool, v_pool,
    token_buffer), the pools and the buffer donated (updated in place); the greedy tokens go to
    the buffer. A call with sampled rows then runs build_sampler's program on the logits.
    on_trace(shape) runs once per compilation, which is how the engine counts them. cache_dtype:
    the cached values' dtype when the pools hold their bits (pool_storage_dtype).

    The step has no conditional: XLA's GPU conditional reads its predicate on the host, a device
    sync inside the call (docs/decisions.md D20), which would make the engine's dispatch wait for
    the forward pass and leave the device idle while the host prepares the next call."""

    def step(params, k_pool, v_pool, token_buffer, input_ids, positions, block_tables, slots: TokenSlots):
        on_trace(tuple(input_ids.shape))
        from_buffer = token_buffer[jnp.maximum(slots.read, 0)]
        last = jnp.where(slots.read >= 0, from_buffer, input_ids[:, -1])
        input_ids = input_ids.at[:, -1].set(last)
        cache = PagedKVCache(k_pool, v_pool, block_tables, positions, dtype=cache_dtype)
        logits, cache = _apply(model, params, input_ids, jnp.maximum(positions, 0), cache, None, None,
                               last_logits_only=True)
        logits = logits[:, -1]
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, logits, cache.k, cache.v, token_buffer.at[slots.write].set(tokens, mode="drop")

    return jax.jit(step, donate_argnums=(1, 2, 3))


def build_sampler(on_trace: Callable[[int], None]):
    """The jitted sample(logits [B, V], sampling: RowSampling, token_buffer [S], write [B]) ->
    (tokens [B], token_buffer), the buffer donated: the step's greedy tokens replaced by each
    row's draw (greedy rows keep theirs). A separate program, run only for calls with sampled
    rows, so that all-greedy calls skip its vocabulary sort without a conditional in the step.
    on_trace(B) runs once per compilation."""

    def sample(logits, sampling: RowSampling, token_buffer, write):
        on_trace(logits.shape[0])
        tokens = choose_row_tokens(logits, sampling)
        return tokens, token_buffer.at[write].set(tokens, mode="drop")

    return jax.jit(sample, donate_argnums=(2,))


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
