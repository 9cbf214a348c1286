"""Text generation: prefill and decode as one jit-compiled program over a static KV cache.

    result = jint8.generate(model, params, input_ids, attention_mask,
                            jint8.GenerationConfig(max_new_tokens=64, eos_token_id=2))
    result.sequences        # [B, prompt_len + max_new_tokens]: the prompt, then the new tokens

One program per (model, batch, bucketed prompt length, bucketed max_new_tokens, decoding mode):
the prompt is left-padded to a multiple of `prompt_length_bucket` and the output buffer sized to a
multiple of `new_tokens_bucket`, while the real max_new_tokens, temperature, top-k, top-p, eos ids
and seed are traced values, so calls that differ only in those reuse the compiled program.

Every decode step is one round of draft-and-verify: the target model reads [last token, d_1..d_K]
(K = 0 for plain decoding) and emits the tokens it agrees with plus one of its own. Drafts come
from an assistant model (speculative decoding) or from n-gram matches in the sequence so far
(prompt-lookup decoding). A batch advances by the smallest agreement over its live sequences, so
every sequence shares one cache_index; that keeps greedy output identical to plain greedy and the
sampled distribution unchanged (each emitted token is still the target's own choice given its
prefix).

With LLM.int8 weights the outlier columns are chosen per matmul over all its rows (as in
bitsandbytes), so a sequence's int8 numerics depend on the rest of its batch and on the padding
rows that batching and bucketing add; float models are batch-invariant up to rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import threading
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import io_callback

from jint8.errors import (
    AssistantMismatchError,
    ContextLengthError,
    EmptyPromptError,
    InvalidConfigError,
    PromptPaddingError,
)

MAX_EOS_IDS = 8  # eos ids travel as a fixed-size traced array so changing them does not recompile

StreamCallback = Callable[[np.ndarray], None]


# ----------------------------------------------------------------------------- configuration


def _as_id_tuple(value, field: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
            raise InvalidConfigError(f"GenerationConfig.{field}={value!r} must be token ids >= 0")
    return tuple(int(t) for t in ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to decode. Values that only change traced numbers never recompile the program.

    max_new_tokens: tokens generated per sequence (the output is padded to this length).
    do_sample: False = greedy. True samples from softmax(logits / temperature) after the top-k
      and top-p filters (transformers' order); temperature == 0 falls back to greedy.
    top_k: keep the k most likely tokens (0 = off). top_p: keep the smallest set of most likely
      tokens whose probability reaches top_p (1 = off).
    eos_token_id: one id or several; a sequence stops at the first one it emits.
    pad_token_id: fills the output after eos (default: the first eos id, else 0).
    seed: the jax.random key of the sampling.
    prompt_length_bucket / new_tokens_bucket: compiled shapes are rounded up to multiples of these.
    num_assistant_tokens: draft length K of speculative decoding with an assistant model.
    prompt_lookup_num_tokens: > 0 turns on prompt-lookup decoding with drafts of this length,
      copied after the latest n-gram (up to max_matching_ngram_size tokens) that matches the end.
    stream_interval: with a stream callback, tokens reach the host in chunks of at least this many.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: Union[int, tuple[int, ...], None] = None
    pad_token_id: Optional[int] = None
    seed: int = 0
    prompt_length_bucket: int = 64
    new_tokens_bucket: int = 32
    num_assistant_tokens: int = 4
    prompt_lookup_num_tokens: int = 0
    max_matching_ngram_size: int = 2
    stream_interval: int = 8

    def __post_init__(self):
        def check_int(name: str, minimum: int):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise InvalidConfigError(f"GenerationConfig.{name}={value!r} must be an int >= {minimum}")

        check_int("max_new_tokens", 1)
        for name in ("top_k", "seed", "prompt_lookup_num_tokens"):
            check_int(name, 0)
        for name in ("prompt_length_bucket", "new_tokens_bucket", "num_assistant_tokens",
                     "max_matching_ngram_size", "stream_interval"):
            check_int(name, 1)
        if not isinstance(self.temperature, (int, float)) or not (0 <= self.temperature < math.inf):
            raise InvalidConfigError(
                f"GenerationConfig.temperature={self.temperature!r} must be a finite number >= 0"
            )
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise InvalidConfigError(f"GenerationConfig.top_p={self.top_p!r} must be in (0, 1]")
        eos = _as_id_tuple(self.eos_token_id, "eos_token_id")
        if len(eos) > MAX_EOS_IDS:
            raise InvalidConfigError(
                f"GenerationConfig.eos_token_id has {len(eos)} ids; at most {MAX_EOS_IDS} are supported"
            )
        object.__setattr__(self, "eos_token_id", eos)
        if self.pad_token_id is not None:
            (pad,) = _as_id_tuple(self.pad_token_id, "pad_token_id")
            object.__setattr__(self, "pad_token_id", pad)

    @property
    def sampling(self) -> bool:
        return bool(self.do_sample) and self.temperature > 0

    @property
    def resolved_pad_token_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What generate returns. Arrays are host numpy arrays.

    sequences: [B, prompt_len + max_new_tokens] int32, the prompt as given then the new tokens
      (pad_token_id after a sequence's eos).
    num_new_tokens: [B] tokens generated per sequence, its eos included.
    decode_steps: target-model forward passes after the prefill.
    accepted_tokens_per_step: mean draft tokens the target accepted per decode step (0 without drafts).
    tokens_per_step: mean tokens emitted per decode step (accepted drafts + the target's own one).
    """

    sequences: np.ndarray
    num_new_tokens: np.ndarray
    decode_steps: int
    accepted_tokens_per_step: float
    tokens_per_step: float


# ----------------------------------------------------------------------------- sampling


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


# ----------------------------------------------------------------------------- the program


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


def _lookup_drafts(tokens, valid, end, length: int, ngram_size: int):
    """Prompt-lookup drafts: after the earliest match of the sequence's last n tokens (largest n
    first, n <= ngram_size) that has a continuation, copy up to `length` tokens. transformers'
    PromptLookupCandidateGenerator, on a static buffer. tokens/valid [B, L]; the sequence ends
    at slot end - 1. Returns drafts [B, length] and how many of them are real [B]."""
    b, total = tokens.shape
    starts = jnp.arange(total)
    best_start = jnp.zeros((b,), jnp.int32)
    found = jnp.zeros((b,), bool)
    for n in range(ngram_size, 0, -1):
        pattern = jax.lax.dynamic_slice_in_dim(tokens, end - n, n, axis=1)  # [B, n]
        match = jnp.ones((b, total), bool)
        for i in range(n):
            shifted_tokens = jnp.roll(tokens, -i, axis=1)
            shifted_valid = jnp.roll(valid, -i, axis=1)
            match &= (shifted_tokens == pattern[:, i : i + 1]) & shifted_valid
        match &= (starts + n < end)[None, :]  # a continuation exists inside the sequence
        match &= jnp.all(jax.lax.dynamic_slice_in_dim(valid, end - n, n, axis=1), axis=1, keepdims=True)
        has = jnp.any(match, axis=1)
        take = has & ~found
        best_start = jnp.where(take, jnp.argmax(match, axis=1) + n, best_start)
        found |= has
    index = jnp.clip(best_start[:, None] + jnp.arange(length)[None, :], 0, total - 1)
    drafts = jnp.take_along_axis(tokens, index, axis=1)
    count = jnp.where(found, jnp.clip(end - best_start, 0, length), 0)
    return drafts, count


def _assistant_drafts(assistant_model, assistant_params, state, plen, slot, key, controls, plan):
    """K tokens from the assistant: one step over [previous, last] (re-writing the previous slot,
    which a fully accepted step never fed it), then K - 1 single-token steps.
    Returns drafts [B, K], the assistant's filtered logits [B, K, V] (V = 0 when greedy) and its cache."""
    k = plan.draft_length
    total = state.tokens.shape[1]
    pair = jax.lax.dynamic_slice_in_dim(state.tokens, slot - 1, 2, axis=1)
    positions = (plen + state.num_written - 2)[:, None] + jnp.arange(2)[None, :]  # [B, 2]
    kv_mask = state.kv_mask | _slot_range(total, slot - 1, slot + 1)
    logits, cache = _apply(assistant_model, assistant_params, pair, positions, state.assistant_cache,
                           slot - 1, kv_mask)
    keys = jax.random.split(key, k)
    # q, the assistant's filtered distributions, only matters to rejection sampling
    vocab = logits.shape[-1] if plan.do_sample else 0
    first = choose_tokens(logits[:, 1], keys[0], controls.sampling, plan.do_sample)
    drafts = jnp.zeros((pair.shape[0], k), jnp.int32).at[:, 0].set(first)
    draft_logits = jnp.zeros((pair.shape[0], k, vocab), jnp.float32)
    if plan.do_sample:
        draft_logits = draft_logits.at[:, 0].set(filter_logits(logits[:, 1], controls.sampling))

    def step(i, carry):
        drafts, draft_logits, cache = carry
        token = jax.lax.dynamic_index_in_dim(drafts, i - 1, axis=1)  # [B, 1]
        mask = state.kv_mask | _slot_range(total, slot - 1, slot + i + 1)
        step_logits, cache = _apply(assistant_model, assistant_params, token,
                                    positions[:, 1:] + i, cache, slot + i, mask)
        new = choose_tokens(step_logits[:, 0], keys[i], controls.sampling, plan.do_sample)
        drafts = jax.lax.dynamic_update_index_in_dim(drafts, new, i, axis=1)
        if plan.do_sample:
            filtered = filter_logits(step_logits[:, 0], controls.sampling)
            draft_logits = jax.lax.dynamic_update_index_in_dim(draft_logits, filtered, i, axis=1)
        return drafts, draft_logits, cache

    drafts, draft_logits, cache = jax.lax.fori_loop(1, k, step, (drafts, draft_logits, cache))
    return drafts, draft_logits, cache


def _verify(target_logits, drafts, draft_count, draft_logits, key, controls, plan):
    """Decide what the target emits. target_logits [B, K+1, V] follow [last, d_1..d_K].

    Returns emitted [B, K+1] (emitted[:, i] is what the target puts at offset i, valid for
    i <= accepted) and accepted [B] (leading drafts kept, <= draft_count).
    Greedy: the target's argmax; drafts are kept while they equal it. Sampling with assistant
    probabilities q: the rejection rule of Leviathan et al. / Chen et al. (keep d with probability
    min(1, p(d)/q(d)); at the first rejection sample from max(p - q, 0)). Prompt-lookup drafts
    are deterministic (q is a point mass), where that rule is: sample t ~ p and keep d iff t == d.
    """
    k = plan.draft_length
    accept_key, sample_key = jax.random.split(key)
    if plan.drafter == "assistant" and plan.do_sample:
        p = jax.nn.softmax(filter_logits(target_logits, controls.sampling), axis=-1)  # [B, K+1, V]
        q = jax.nn.softmax(draft_logits, axis=-1)  # [B, K, V]
        p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
        q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        uniform = jax.random.uniform(accept_key, p_draft.shape)
        keep = uniform * q_draft < p_draft
        residual = jnp.maximum(p[:, :k] - q, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p[:, :k])
        corrections = jnp.concatenate([residual, p[:, k:]], axis=1)
        corrections = jax.random.categorical(sample_key, jnp.log(corrections), axis=-1).astype(jnp.int32)
    else:
        corrections = choose_tokens(target_logits, sample_key, controls.sampling, plan.do_sample)
        keep = drafts == corrections[:, :k]
    keep &= jnp.arange(k)[None, :] < draft_count[:, None]
    accepted = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)
    offsets = jnp.arange(k + 1)[None, :]
    padded_drafts = jnp.concatenate([drafts, jnp.zeros_like(corrections[:, :1])], axis=1)
    emitted = jnp.where(offsets < accepted[:, None], padded_drafts, corrections)
    return emitted, accepted


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


# ----------------------------------------------------------------------------- host side


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _prepare_prompt(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise EmptyPromptError(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise EmptyPromptError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != ids.shape:
        raise PromptPaddingError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise EmptyPromptError(f"prompt rows {empty.tolist()} have no tokens (attention_mask all 0)")
    right_padded = np.flatnonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1))
    if right_padded.size:
        raise PromptPaddingError(
            f"prompt rows {right_padded.tolist()} are right-padded; generate needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    return ids.astype(np.int32), mask


def _check_model_limits(model, ids, mask, config: GenerationConfig, assistant_model) -> None:
    vocab = model.config.vocab_size
    context = getattr(model.config, "max_position_embeddings", None)
    longest = int(mask.sum(axis=1).max())
    if context is not None and longest > context:
        raise ContextLengthError(f"prompt length {longest} exceeds the model's context "
                                 f"max_position_embeddings={context}")
    if context is not None and longest + config.max_new_tokens > context:
        raise ContextLengthError(
            f"prompt length {longest} + max_new_tokens={config.max_new_tokens} exceeds the model's "
            f"context max_position_embeddings={context}; lower max_new_tokens to <= {context - longest}"
        )
    out_of_vocab = ids[mask] >= vocab
    if np.any(out_of_vocab) or np.any(ids[mask] < 0):
        raise EmptyPromptError(f"input_ids hold token ids outside [0, vocab_size={vocab})")
    if assistant_model is not None and assistant_model.config.vocab_size != vocab:
        raise AssistantMismatchError(
            f"assistant vocab_size={assistant_model.config.vocab_size} != model vocab_size={vocab}; "
            "speculative decoding needs the same tokenizer"
        )


def _plan_for(config: GenerationConfig, assistant_model, streaming: bool) -> _Plan:
    if assistant_model is not None and config.prompt_lookup_num_tokens:
        raise InvalidConfigError(
            "use either assistant_model or GenerationConfig.prompt_lookup_num_tokens, not both"
        )
    drafter, draft_length = "none", 0
    if assistant_model is not None:
        drafter, draft_length = "assistant", config.num_assistant_tokens
    elif config.prompt_lookup_num_tokens:
        drafter, draft_length = "lookup", config.prompt_lookup_num_tokens
    return _Plan(
        new_tokens_capacity=_round_up(config.max_new_tokens, config.new_tokens_bucket),
        draft_length=draft_length,
        drafter=drafter,
        ngram_size=config.max_matching_ngram_size if drafter == "lookup" else 0,
        do_sample=config.sampling,
        streaming=streaming,
        stream_interval=config.stream_interval,
    )


def generate(
    model,
    params,
    input_ids,
    attention_mask=None,
    config: Optional[GenerationConfig] = None,
    *,
    stream: Optional[StreamCallback] = None,
    assistant_model=None,
    assistant_params=None,
) -> GenerationResult:
    """Generate config.max_new_tokens tokens after each (left-padded) prompt.

    model: a jint8 causal LM (flax.linen; `model.config` has vocab_size, max_position_embeddings)
    whose apply takes (input_ids, positions=, cache=, cache_index=, kv_mask=).
    input_ids: [B, T] or [T] token ids; attention_mask: same shape, 1 for real tokens, 0 for
      left padding.
    stream: called on the host with each new chunk of tokens [B, n] (pad after eos) while the
      compiled loop runs; chunks arrive in order and together make up the new tokens.
    assistant_model, assistant_params: a smaller model with the same vocabulary for speculative
      decoding (K = config.num_assistant_tokens drafts per step).
    """
    config = config or GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise InvalidConfigError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if (assistant_model is None) != (assistant_params is None):
        raise InvalidConfigError("assistant_model and assistant_params must be given together")
    ids, mask = _prepare_prompt(input_ids, attention_mask)
    _check_model_limits(model, ids, mask, config, assistant_model)
    plan = _plan_for(config, assistant_model, stream is not None)
    pad_id = config.resolved_pad_token_id

    batch, length = ids.shape
    padded_length = _round_up(length, config.prompt_length_bucket)
    padded_ids = np.full((batch, padded_length), pad_id, np.int32)
    padded_mask = np.zeros((batch, padded_length), bool)
    padded_ids[:, padded_length - length :], padded_mask[:, padded_length - length :] = ids, mask
    padded_ids = np.where(padded_mask, padded_ids, 0).astype(np.int32)  # pad id may be >= vocab
    eos = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos[: len(config.eos_token_id)] = config.eos_token_id
    controls = _Controls(
        max_new_tokens=jnp.int32(config.max_new_tokens),
        eos_ids=jnp.asarray(eos),
        pad_id=jnp.int32(pad_id),
        key=jax.random.key(config.seed),
        sampling=SamplingParams.from_config(config),
        stream_id=jnp.int32(0),
    )
    if stream is not None:
        stream_id = next(_stream_ids) % 2**31
        _streams[stream_id] = (stream, config.max_new_tokens)
        controls = controls.replace(stream_id=jnp.int32(stream_id))
    try:
        tokens, num_written, steps, accepted = jax.block_until_ready(_generation_program(
            model, params, assistant_model, assistant_params, jnp.asarray(padded_ids),
            jnp.asarray(padded_mask), controls, plan))
    finally:
        if stream is not None:
            _streams.pop(int(controls.stream_id), None)
    return _result(np.asarray(tokens), int(num_written), int(steps), int(accepted), ids, padded_length,
                   config, pad_id)


def _result(tokens, num_written, steps, accepted, ids, prompt_slots, config, pad_id) -> GenerationResult:
    max_new = config.max_new_tokens
    new = tokens[:, prompt_slots : prompt_slots + max_new].copy()
    new[:, min(num_written, max_new) :] = pad_id
    is_eos = np.isin(new, np.asarray(config.eos_token_id, np.int64)) if config.eos_token_id else np.zeros_like(new, bool)
    first_eos = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, min(num_written, max_new))
    return GenerationResult(
        sequences=np.concatenate([ids, new], axis=1),
        num_new_tokens=first_eos.astype(np.int32),
        decode_steps=steps,
        accepted_tokens_per_step=accepted / steps if steps else 0.0,
        tokens_per_step=(min(num_written, max_new) - 1) / steps if steps else 0.0,
    )


__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "SamplingParams",
    "choose_tokens",
    "clear_compiled_programs",
    "compile_count",
    "filter_logits",
    "generate",
]
