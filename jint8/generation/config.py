"""GenerationConfig (how to decode, validated) and GenerationResult (what generate returns)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import numpy as np

from jint8.errors import InvalidConfigError

MAX_EOS_IDS = 8  # eos ids travel as a fixed-size traced array so changing them does not recompile

StreamCallback = Callable[[np.ndarray], None]


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
