"""generate: the host side. Checks and left-pads the prompt to its bucket, picks the plan, runs
the compiled program and trims its output into a GenerationResult."""

from __future__ import annotations

import contextlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jint8.errors import (
    AssistantMismatchError,
    ContextLengthError,
    EmptyPromptError,
    InvalidConfigError,
    PromptPaddingError,
)
from jint8.generation.config import MAX_EOS_IDS, GenerationConfig, GenerationResult, StreamCallback
from jint8.generation.loop import _generation_program, _stream_ids, _streams
from jint8.generation.prompts import checked_ids_and_mask
from jint8.generation.sampling import SamplingParams
from jint8.generation.seq2seq import generate_seq2seq
from jint8.generation.state import _Controls, _Plan


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _prepare_prompt(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = checked_ids_and_mask(input_ids, attention_mask)
    right_padded = np.flatnonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1))
    if right_padded.size:
        raise PromptPaddingError(
            f"prompt rows {right_padded.tolist()} are right-padded; generate needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    return ids, mask


def _check_model_limits(model, ids, mask, config: GenerationConfig, assistant_model) -> np.ndarray:
    """Check the prompt against the model; returns the ids as int32 (cast only once they are
    known to lie in the vocabulary, so 2**32 + 5 cannot wrap to token 5)."""
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
    return ids.astype(np.int32)


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


def _params_mesh(params) -> Optional[jax.sharding.Mesh]:
    """The mesh of a parameter tree placed on more than one device (from_pretrained(mesh=)), else None."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _on_params_mesh(params, assistant_params=None):
    """jax.set_mesh(the params' mesh) unless a mesh is set already: under it each int8 layer runs
    its kernel on its own shard (layers.tensor_parallel_layout) rather than replicated."""
    mesh = _params_mesh(params) or (_params_mesh(assistant_params) if assistant_params is not None else None)
    if mesh is None or not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


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
    An encoder-decoder model (T5) goes to generate_seq2seq: input_ids feed the encoder and the
    result's sequences are the decoder's (start token, then the new tokens).
    params on a mesh (from_pretrained(mesh=)): the program runs SPMD on it, under jax.set_mesh
    of that mesh unless one is set (each int8 projection runs on its own shard); in a
    multi-process run (jax.distributed) every process calls generate with the same arguments.
    """
    with _on_params_mesh(params, assistant_params):
        return _generate(model, params, input_ids, attention_mask, config, stream=stream,
                         assistant_model=assistant_model, assistant_params=assistant_params)


def _generate(model, params, input_ids, attention_mask, config, *, stream, assistant_model, assistant_params):
    config = config or GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise InvalidConfigError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if (assistant_model is None) != (assistant_params is None):
        raise InvalidConfigError("assistant_model and assistant_params must be given together")
    if getattr(model, "IS_ENCODER_DECODER", False):
        if stream is not None or assistant_model is not None:
            raise InvalidConfigError(f"{type(model).__name__} is an encoder-decoder model: generate takes no "
                                     "stream or assistant_model for it")
        return generate_seq2seq(model, params, input_ids, attention_mask, config)
    ids, mask = _prepare_prompt(input_ids, attention_mask)
    ids = _check_model_limits(model, ids, mask, config, assistant_model)
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
