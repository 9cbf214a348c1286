"""generate for encoder-decoder models (T5): the encoder runs once, the decoder's cross-attention
keys and values are projected once (model.init_cache), then one jitted lax.while_loop steps the
decoder from decoder_start_token_id through its static self-attention cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jint8.errors import EmptyPromptError, InvalidConfigError
from jint8.generation.config import MAX_EOS_IDS, GenerationConfig, GenerationResult
from jint8.generation.prompts import checked_ids_and_mask
from jint8.generation.sampling import SamplingParams, choose_tokens


def _encoder_inputs(input_ids, attention_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, E] ids and mask; either padding side is fine (the encoder is bidirectional and its
    position bias depends on distances only)."""
    ids, mask = checked_ids_and_mask(input_ids, attention_mask)
    if np.any(ids[mask] < 0) or np.any(ids[mask] >= vocab_size):
        raise EmptyPromptError(f"input_ids hold token ids outside [0, vocab_size={vocab_size})")
    return np.where(mask, ids, 0).astype(np.int32), mask


@functools.partial(jax.jit, static_argnames=("model", "capacity", "do_sample"))
def _seq2seq_program(model, params, ids, mask, max_new_tokens, eos_ids, pad_id, start_id, key, sampling, *,
                     capacity: int, do_sample: bool):
    """-> tokens [B, 1 + capacity] (start token first, pad after eos and past max_new_tokens) and
    the steps run. capacity: the decoder cache's slots, max_new_tokens rounded up to its bucket."""
    variables = {"params": params}
    batch = ids.shape[0]
    encoded = model.apply(variables, ids, mask, method="encode")
    cache = model.apply(variables, encoded, mask, capacity, method="init_cache")
    tokens = jnp.full((batch, 1 + capacity), pad_id, jnp.int32).at[:, 0].set(start_id)
    finished = jnp.zeros((batch,), bool)

    def running(state):
        step, _, _, finished = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(state):
        step, tokens, cache, finished = state
        current = jax.lax.dynamic_slice_in_dim(tokens, step, 1, axis=1)
        logits, cache = model.apply(variables, current, cache, step, method="decode")
        chosen = choose_tokens(logits[:, -1], jax.random.fold_in(key, step), sampling, do_sample)
        chosen = jnp.where(finished, pad_id, chosen)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], step + 1, axis=1)
        finished = finished | jnp.any(chosen[:, None] == eos_ids[None, :], axis=1)
        return step + 1, tokens, cache, finished

    steps, tokens, _, _ = jax.lax.while_loop(running, body, (jnp.int32(0), tokens, cache, finished))
    return tokens, steps


def generate_seq2seq(model, params, input_ids, attention_mask=None, config=None) -> GenerationResult:
    """Encoder-decoder generation: config.max_new_tokens decoder tokens after decoder_start_token_id.

    model: a jint8 encoder-decoder model (T5ForConditionalGeneration). input_ids [B, E] or [E]
    (either padding side, attention_mask 1 for real tokens). eos_token_id / pad_token_id default
    to the model config's. Greedy or sampled (temperature, top-k, top-p) as config says; draft
    decoding (assistant, prompt lookup) is not offered for encoder-decoder models.

    Returns a GenerationResult whose sequences are the decoder's [B, 1 + max_new_tokens]: the
    start token, then the new tokens (pad after eos), as transformers' generate returns them.
    Compiled shapes are bucketed like generate's (prompt_length_bucket, new_tokens_bucket), so
    max_new_tokens, eos, pad and the sampling values are traced.
    """
    config = config or GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise InvalidConfigError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if config.prompt_lookup_num_tokens:
        raise InvalidConfigError("GenerationConfig.prompt_lookup_num_tokens: prompt-lookup decoding is not "
                                 "supported for encoder-decoder models")
    model_config = model.config
    ids, mask = _encoder_inputs(input_ids, attention_mask, model_config.vocab_size)
    # compiled shapes are bucketed as generate's: masked encoder slots change no result (keys
    # outside the mask get no weight, and the position bias depends on distances only)
    batch, length = ids.shape
    padded = -(-length // config.prompt_length_bucket) * config.prompt_length_bucket
    ids = np.pad(ids, ((0, 0), (0, padded - length)))
    mask = np.pad(mask, ((0, 0), (0, padded - length)))
    capacity = -(-config.max_new_tokens // config.new_tokens_bucket) * config.new_tokens_bucket
    eos_tuple = config.eos_token_id or (() if model_config.eos_token_id is None else (model_config.eos_token_id,))
    pad_id = config.pad_token_id if config.pad_token_id is not None else model_config.pad_token_id
    eos = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos[: len(eos_tuple)] = eos_tuple
    tokens, steps = _seq2seq_program(
        model, params, jnp.asarray(ids), jnp.asarray(mask), jnp.int32(config.max_new_tokens), jnp.asarray(eos),
        jnp.int32(pad_id), jnp.int32(model_config.decoder_start_token_id), jax.random.key(config.seed),
        SamplingParams.from_config(config), capacity=capacity, do_sample=config.sampling)
    tokens, steps = np.asarray(tokens)[:, : 1 + config.max_new_tokens], int(steps)
    new = tokens[:, 1:]
    is_eos = np.isin(new, np.asarray(eos_tuple, np.int64)) if eos_tuple else np.zeros_like(new, bool)
    num_new = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, steps)
    return GenerationResult(sequences=tokens, num_new_tokens=num_new.astype(np.int32), decode_steps=steps,
                            accepted_tokens_per_step=0.0, tokens_per_step=1.0 if steps else 0.0)
