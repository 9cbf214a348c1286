"""The compiled program: prefill, then one lax.while_loop of draft-and-verify decode steps,
streaming tokens to the host as it goes; its trace counter and stream callback registry."""

from __future__ import annotations

import functools
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jint8.generation.config import StreamCallback
from jint8.generation.drafting import _assistant_drafts, _lookup_drafts, _verify
from jint8.generation.sampling import choose_tokens
from jint8.generation.state import _apply, _Controls, _is_eos, _Plan, _slot_range, _State


_trace_lock = threading.Lock()
_trace_count = 0
# Stream callbacks of the calls in flight, by id. The compiled program names its callback by a
# traced id because io_callback runs on a runtime thread (not the caller's) on accelerators.
_streams: dict[int, tuple[StreamCallback, int]] = {}
_stream_ids = itertools.count(1)


def compile_count() -> int:
    """How many generation programs were traced (each trace is one XLA compilation)."""
    return _trace_count


def clear_compiled_programs() -> None:
    """Drop the compiled generation programs and reset compile_count()."""
    global _trace_count
    _generation_program.clear_cache()
    with _trace_lock:
        _trace_count = 0


def _stream_to_host(stream_id, tokens, start, end) -> None:
    callback, max_new_tokens = _streams.get(int(stream_id), (None, 0))
    start, end = int(start), min(int(end), max_new_tokens)
    if callback is not None and end > start:
        callback(np.asarray(tokens)[:, start:end])


def _decode_step(model, params, assistant_model, assistant_params, plen, controls, plan, state: _State):
    """One round: draft K tokens, run the target over [last, drafts], emit what it accepts + 1."""
    b, total = state.tokens.shape
    prompt_slots = total - plan.new_tokens_capacity - plan.draft_length - 1
    k = plan.draft_length
    slot = prompt_slots + state.num_written - 1  # the last emitted token, not yet in the cache
    key = jax.random.fold_in(controls.key, state.num_written)
    draft_key, verify_key = jax.random.split(key)
    draft_logits = None
    if plan.drafter == "assistant":
        drafts, draft_logits, assistant_cache = _assistant_drafts(
            assistant_model, assistant_params, state, plen, slot, draft_key, controls, plan)
        draft_count = jnp.full((b,), k, jnp.int32)
        state = state.replace(assistant_cache=assistant_cache)
    elif plan.drafter == "lookup":
        valid = state.kv_mask | _slot_range(total, slot, slot + 1)
        drafts, draft_count = _lookup_drafts(state.tokens, valid, slot + 1, k, plan.ngram_size)
    else:
        drafts, draft_count = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32)

    last = jax.lax.dynamic_slice_in_dim(state.tokens, slot, 1, axis=1)
    block = jnp.concatenate([last, drafts], axis=1)  # [B, K+1]
    positions = (plen + state.num_written - 1)[:, None] + jnp.arange(k + 1)[None, :]
    kv_mask = state.kv_mask | _slot_range(total, slot, slot + k + 1)
    logits, cache = _apply(model, params, block, positions, state.cache, slot, kv_mask)
    emitted, accepted = _verify(logits, drafts, draft_count, draft_logits, verify_key, controls, plan)

    # A batch advances by its smallest agreement; finished sequences do not hold it back.
    advance = jnp.min(jnp.where(state.done, k, accepted))
    is_eos = _is_eos(emitted, controls.eos_ids)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos > 0
    emitted = jnp.where(state.done[:, None] | eos_before, controls.pad_id, emitted)
    in_step = jnp.arange(k + 1)[None, :] <= advance
    done = state.done | jnp.any(is_eos & in_step, axis=1)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, emitted, slot + 1, axis=1)
    return state.replace(
        tokens=tokens,
        num_written=state.num_written + advance + 1,
        done=done,
        kv_mask=state.kv_mask | _slot_range(total, slot, slot + advance + 1),
        cache=cache,
        steps=state.steps + 1,
        accepted=state.accepted + advance,
    )


def _maybe_stream(state: _State, controls: _Controls, prompt_slots: int, plan: _Plan, final: bool) -> _State:
    if not plan.streaming:
        return state

    def flush(streamed):
        io_callback(_stream_to_host, None, controls.stream_id, state.tokens[:, prompt_slots:], streamed,
                    state.num_written, ordered=True)
        return state.num_written

    if final:
        return state.replace(streamed=flush(state.streamed))
    ready = state.num_written - state.streamed >= plan.stream_interval
    return state.replace(streamed=jax.lax.cond(ready, flush, lambda s: s, state.streamed))


@functools.partial(jax.jit, static_argnames=("model", "assistant_model", "plan"))
def _generation_program(model, params, assistant_model, assistant_params, input_ids, prompt_mask,
                        controls: _Controls, plan: _Plan):
    """input_ids, prompt_mask [B, T] (left-padded) -> (tokens [B, L], num_written, steps, accepted)."""
    from jint8.models import init_cache

    global _trace_count
    with _trace_lock:
        _trace_count += 1
    b, prompt_slots = input_ids.shape
    total = prompt_slots + plan.new_tokens_capacity + plan.draft_length + 1
    plen = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    kv_mask = jnp.zeros((b, total), bool).at[:, :prompt_slots].set(prompt_mask.astype(bool))
    logits, cache = _apply(model, params, input_ids, positions, init_cache(model.config, b, total), 0, kv_mask,
                           last_logits_only=True)
    assistant_cache = None
    if plan.drafter == "assistant":
        _, assistant_cache = _apply(assistant_model, assistant_params, input_ids, positions,
                                    init_cache(assistant_model.config, b, total), 0, kv_mask,
                                    last_logits_only=True)
    first = choose_tokens(logits[:, -1], jax.random.fold_in(controls.key, 0), controls.sampling, plan.do_sample)
    tokens = jnp.full((b, total), controls.pad_id, jnp.int32).at[:, :prompt_slots].set(input_ids)
    tokens = tokens.at[:, prompt_slots].set(first)
    zero = jnp.zeros((), jnp.int32)
    state = _State(tokens=tokens, num_written=jnp.ones((), jnp.int32), done=_is_eos(first, controls.eos_ids),
                   kv_mask=kv_mask, cache=cache, assistant_cache=assistant_cache, steps=zero,
                   accepted=zero, streamed=zero)

    def keep_going(state):
        return (state.num_written < controls.max_new_tokens) & ~jnp.all(state.done)

    def body(state):
        state = _decode_step(model, params, assistant_model, assistant_params, plen, controls, plan, state)
        return _maybe_stream(state, controls, prompt_slots, plan, final=False)

    state = jax.lax.while_loop(keep_going, body, state)
    state = _maybe_stream(state, controls, prompt_slots, plan, final=True)
    return state.tokens, state.num_written, state.steps, state.accepted
