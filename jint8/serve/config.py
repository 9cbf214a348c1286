"""The engine's configuration and a request's sampling options, validated where they are built."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from jint8.errors import InvalidConfigError, InvalidRequestError


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """max_batch: sequences decoding together. max_context: positions per sequence (default the
    model's max_position_embeddings). num_blocks: the pool's blocks of block_size positions
    (default: max_batch full contexts, + the scratch block). max_tokens_in_flight: caps what
    admitted requests may reserve (prompt + max_tokens summed), below the pool's capacity.
    prefill_chunk: the most prompt tokens of one sequence in one prefill call.
    prefill_tokens_per_step: the size of the one prefill call between two decode steps, rows x
    chunk columns as compiled (padding included; default prefill_chunk): several prompts'
    chunks share the call while they fit. More starts queued prompts sooner (time to first
    token, throughput) and delays running streams longer (inter-token latency).
    prefill_batch: the most sequences in one prefill call (default max_batch).
    max_queue: requests waiting for a slot before submit raises QueueFullError.
    batch_buckets / chunk_buckets / prefill_batch_buckets: the compiled decode batch sizes,
    prefill chunk lengths and prefill row counts (default powers of two up to max_batch /
    prefill_chunk / prefill_batch); a prefill shape of several rows is compiled only where
    rows x chunk <= prefill_tokens_per_step."""

    max_batch: int = 8
    max_context: Optional[int] = None
    block_size: int = 16
    num_blocks: Optional[int] = None
    max_tokens_in_flight: Optional[int] = None
    prefill_chunk: int = 256
    prefill_tokens_per_step: Optional[int] = None
    prefill_batch: Optional[int] = None
    max_queue: int = 256
    batch_buckets: tuple[int, ...] = ()
    chunk_buckets: tuple[int, ...] = ()
    prefill_batch_buckets: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("max_batch", "block_size", "prefill_chunk", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise InvalidConfigError(f"EngineConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("max_context", "num_blocks", "max_tokens_in_flight", "prefill_tokens_per_step", "prefill_batch"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise InvalidConfigError(f"EngineConfig.{name}={value} must be >= 1")
        if self.prefill_batch is not None and self.prefill_batch > self.max_batch:
            raise InvalidConfigError(f"EngineConfig.prefill_batch={self.prefill_batch} must be <= "
                                     f"max_batch={self.max_batch} (only admitted sequences prefill)")
        for name, largest in (("batch_buckets", self.max_batch), ("chunk_buckets", self.prefill_chunk),
                              ("prefill_batch_buckets", self.prefill_batch or self.max_batch)):
            buckets = getattr(self, name)
            if buckets and (list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] != largest):
                raise InvalidConfigError(f"EngineConfig.{name}={buckets} must be ascending, >= 1 and end at "
                                         f"{largest}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """One request's decoding: temperature 0 is greedy; top_k 0 and top_p 1 are off; seed None
    draws one; stop_token_ids end the request like the model's eos ids (which always do)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens={self.max_tokens!r} must be an integer >= 1", "max_tokens")
        if not 0.0 <= self.temperature <= 100.0 or math.isnan(self.temperature):
            raise InvalidRequestError(f"temperature={self.temperature!r} must be in [0, 100]", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p={self.top_p!r} must be in (0, 1]", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k={self.top_k!r} must be >= 0 (0 = off)", "top_k")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise InvalidRequestError(f"seed={self.seed!r} must be in [0, 2**32)", "seed")
