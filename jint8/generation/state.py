"""What the compiled decode loop and the drafters share: the static plan, the traced per-call
controls, the loop's carry, and the call into a model over the static KV cache."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jint8.generation.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static part of a generation program (one compiled program per distinct plan)."""

    new_tokens_capacity: int  # output slots, max_new_tokens rounded up to new_tokens_bucket
    draft_length: int  # K: 0 plain, else tokens drafted per step
    drafter: str  # "none" | "assistant" | "lookup"
    ngram_size: int
    do_sample: bool
    streaming: bool
    stream_interval: int


@struct.dataclass
class _Controls:
    """Traced per-call values."""

    max_new_tokens: jax.Array
    eos_ids: jax.Array  # [MAX_EOS_IDS], -1 = unused
    pad_id: jax.Array
    key: jax.Array
    sampling: SamplingParams
    stream_id: jax.Array  # which registered stream callback receives this call's tokens


@struct.dataclass
class _State:
    """The decode loop's carry. tokens [B, L] holds the prompt in [0, T) and output j at T + j,
    which is also the token's cache slot."""

    tokens: jax.Array
    num_written: jax.Array  # output tokens written (same for every sequence)
    done: jax.Array  # [B]
    kv_mask: jax.Array  # [B, L] slots whose keys/values hold accepted tokens
    cache: Any
    assistant_cache: Any
    steps: jax.Array
    accepted: jax.Array  # draft tokens accepted, summed over steps
    streamed: jax.Array  # output tokens already sent to the stream callback


def _apply(model, params, ids, positions, cache, cache_index, kv_mask, last_logits_only=False):
    extra = {}
    if last_logits_only and _accepts_logits_to_keep(type(model)):
        # the prefill needs one position's logits, not [B, T, vocab] float32 (2 GiB at B=8,
        # T=512, vocab 128256) nor the lm_head FLOPs of every prompt token
        extra["logits_to_keep"] = 1
    return model.apply({"params": params}, ids, positions=positions, cache=cache,
                       cache_index=cache_index, kv_mask=kv_mask, **extra)


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_class) -> bool:
    """Whether the model's __call__ takes transformers' `logits_to_keep` (last N positions)."""
    return "logits_to_keep" in inspect.signature(model_class.__call__).parameters


def _slot_range(length: int, start, stop) -> jax.Array:
    """[1, length] bool: start <= slot < stop."""
    slots = jnp.arange(length)[None, :]
    return (slots >= start) & (slots < stop)


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)
