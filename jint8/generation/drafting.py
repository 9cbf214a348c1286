"""Draft-and-verify: prompt-lookup drafts, assistant-model drafts, and the target's verification
(greedy agreement or speculative rejection sampling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jint8.generation.sampling import choose_tokens, filter_logits
from jint8.generation.state import _apply, _slot_range


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
