"""The continuous-batching engine: a scheduler thread that runs the compiled step over a paged KV cache.

Every iteration of the engine thread (1) takes new and cancelled requests in, (2) admits waiting
requests into free batch slots while the cache can hold their worst case (prompt + max_tokens),
(3) runs one prefill call: the next chunks of the oldest admitted prompts, several sequences as
rows of one [P, T] call while rows x chunk fit `prefill_tokens_per_step`, and (4) runs one
decode step of every sequence past its prompt. Requests join and leave the batch at every step;
a long prompt is spread over several iterations so running streams keep getting tokens.
Shapes are rounded up to the batch, prefill-row and chunk buckets: after each has run once
nothing compiles.

The host does not wait for a call before preparing and dispatching the next: chosen tokens stay
in a device buffer (one entry per batch slot) that the next decode step reads its inputs from,
and each call's tokens are copied to the host while the next call runs, then delivered. A
sequence that ends on a stop token has therefore already been dispatched one more step; that
step's token is dropped (its write stays within the sequence's reserved blocks, and a block
freed meanwhile is rewritten by a later call only after it, in the device's call order).

Callers submit token ids and get tokens back through a callback `sink(tokens, finish_reason)`
that runs on the engine thread (finish_reason None while the request runs, then "stop",
"length" or "abort").
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import os
import queue
import secrets
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jint8.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from jint8.models.common import init_paged_pool
from jint8.ops.attention.paged import pool_storage_dtype
from jint8.serve.config import EngineConfig, SamplingOptions
from jint8.serve.metrics import ServeMetrics
from jint8.serve.paged_cache import BlockAllocator
from jint8.serve.step import RowSampling, TokenSlots, bucket_for, build_sampler, build_step, default_buckets

logger = logging.getLogger("jint8.serve")

Sink = Callable[[list, Optional[str]], None]


@dataclasses.dataclass(eq=False)
class _Sequence:
    id: int
    prompt: list
    options: SamplingOptions
    sink: Sink
    seed: int
    arrival: float
    computed: int = 0  # positions in the cache once the calls dispatched so far have run
    sampled: int = 0  # tokens chosen by the calls dispatched so far (delivered or in flight)
    slot: int = -1  # its entry in the device token buffer while admitted
    generated: list = dataclasses.field(default_factory=list)  # delivered tokens
    last_token_time: float = 0.0


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A dispatched call whose tokens are not yet delivered: tokens [B] on the device and, per
    row, the sequence that gets its token (None: a padding row or a prompt not yet done)."""

    tokens: jax.Array
    receivers: list


class Engine:
    """Continuous batching of one model over a paged KV cache, the compiled step on one thread.

    engine = Engine(model, params, EngineConfig(max_batch=16), eos_token_ids=(2,)); engine.start()
    request_id = engine.submit(prompt_ids, SamplingOptions(max_tokens=64), sink)
    engine.generate([[1, 2, 3]], SamplingOptions(max_tokens=8))  # blocking, for scripts and tests
    """

    def __init__(self, model, params, config: EngineConfig = EngineConfig(), *,
                 eos_token_ids: Sequence[int] = (), cache_dtype=None):
        self.model, self.params, self.config = model, params, config
        self.max_context = int(config.max_context or model.config.max_position_embeddings)
        self.batch_buckets = config.batch_buckets or default_buckets(config.max_batch)
        self.chunk_buckets = config.chunk_buckets or default_buckets(config.prefill_chunk, min(16, config.prefill_chunk))
        self.prefill_batch = config.prefill_batch or config.max_batch
        self.prefill_batch_buckets = config.prefill_batch_buckets or default_buckets(self.prefill_batch)
        self.prefill_budget = config.prefill_tokens_per_step or config.prefill_chunk
        max_blocks = math.ceil(self.max_context / config.block_size)
        num_blocks = config.num_blocks or config.max_batch * max_blocks + 1
        self.allocator = BlockAllocator(num_blocks, config.block_size, max_blocks)
        self.cache_dtype = jnp.dtype(cache_dtype or model.config.dtype)
        # on the CPU 16-bit values are kept as their bits: a scatter that writes only the new slots
        self._pool_dtype = pool_storage_dtype(self.cache_dtype, jax.default_backend())
        self.k_pool, self.v_pool = init_paged_pool(model.config, num_blocks, config.block_size, self._pool_dtype)
        logger.info("KV cache: %d blocks of %d positions (%.2f GiB for keys and values)", num_blocks,
                    config.block_size, 2 * self.k_pool.nbytes / 2**30)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.metrics = ServeMetrics(config.max_batch)
        self.compiled_shapes: list[tuple] = []  # the step's [B, T] shapes
        self.compiled_sampler_rows: list[int] = []  # the sampler's row counts
        self._step = build_step(model, self.compiled_shapes.append, self.cache_dtype)
        self._sample = build_sampler(self.compiled_sampler_rows.append)
        # The chosen tokens stay on the device for the next decode step; the host reads them a
        # call later, while the device runs the next one (_InFlight), to deliver them.
        self._token_buffer = jnp.zeros((config.max_batch,), jnp.int32)
        self._free_slots = list(range(config.max_batch - 1, -1, -1))
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted (guarded by _lock)
        self._ids = itertools.count()
        self._by_id: dict[int, _Sequence] = {}
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._decoding: list[_Sequence] = []
        self._reserved_tokens = 0
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._cancel_on_stop = False
        self._waited = 0.0  # seconds this iteration spent waiting for tokens (host_seconds excludes them)
        self._dispatching = 0.0  # seconds this iteration spent in JAX's dispatch calls (dispatch_seconds)
        # (decoding sequence ids + rows bucket, their ids, tables, slots on the device) of the last decode step
        self._decode_inputs: Optional[tuple] = None

    # ------------------------------------------------------------------ public API (any thread)
    @property
    def compile_count(self) -> int:
        return len(self.compiled_shapes) + len(self.compiled_sampler_rows)

    @property
    def max_request_tokens(self) -> int:
        """The most positions (prompt + max_tokens) one request can have."""
        return min(self.max_context, self._token_capacity)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jint8-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, *, cancel: bool = False, timeout: Optional[float] = None) -> None:
        """Stop taking requests; finish the ones in flight (cancel=True: end them with "abort")."""
        self._stopping, self._cancel_on_stop = True, cancel or self._cancel_on_stop
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def check_prompt(self, prompt_ids: Sequence[int], options: SamplingOptions, param: str = "prompt") -> None:
        """Raise InvalidRequestError (naming `param`) if the prompt cannot run with these options."""
        if len(prompt_ids) == 0:
            raise InvalidRequestError(f"{param} is empty", param)
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequestError(f"{param} has token ids outside [0, {vocab})", param)
        total = len(prompt_ids) + options.max_tokens
        if total > self.max_context:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_context} tokens; the request has "
                f"{len(prompt_ids)} in {param} and max_tokens={options.max_tokens} ({total} in all)", param)
        if total > self._token_capacity:
            raise InvalidRequestError(f"{total} tokens (prompt + max_tokens) exceed the engine's "
                                      f"max_tokens_in_flight={self._token_capacity}", "max_tokens")

    def submit(self, prompt_ids: Sequence[int], options: SamplingOptions, sink: Sink) -> int:
        """Queue a request; its tokens go to sink on the engine thread. Returns its id (for cancel)."""
        prompt = [int(t) for t in prompt_ids]
        self.check_prompt(prompt, options)
        if self._stopping:
            raise EngineStoppedError("the engine is shutting down")
        with self._lock:
            if self._queued >= self.config.max_queue:
                self.metrics.rejected.inc()
                raise QueueFullError(f"{self._queued} requests are waiting (max_queue={self.config.max_queue})")
            self._queued += 1
        seed = options.seed if options.seed is not None else secrets.randbits(32)
        sequence = _Sequence(next(self._ids), prompt, options, sink, seed, time.perf_counter())
        self._inbox.put(sequence)
        self._wake.set()
        return sequence.id

    def cancel(self, request_id: int, reason: str = "abort") -> None:
        """End a request at the next step: its slot and blocks are freed and its sink gets ([], reason)
        ("stop" when the caller found a stop string). Unknown or finished ids are ignored."""
        self._inbox.put((request_id, reason))
        self._wake.set()

    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions = SamplingOptions(),
                 timeout: Optional[float] = None) -> list[list[int]]:
        """Run prompts as concurrent requests and wait for all: their generated token ids."""
        done = [threading.Event() for _ in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]

        def sink_for(i):
            def sink(tokens, finish_reason):
                outputs[i].extend(tokens)
                if finish_reason is not None:
                    done[i].set()
            return sink

        for i, prompt in enumerate(prompts):
            self.submit(prompt, options, sink_for(i))
        for event in done:
            if not event.wait(timeout):
                raise TimeoutError(f"generate: no result within {timeout} s")
        return outputs

    @property
    def prefill_shapes(self) -> list[tuple[int, int]]:
        """The [rows, chunk] shapes a prefill call can take: one row of any chunk bucket, several
        rows where rows x chunk <= prefill_tokens_per_step."""
        return [(rows, width) for rows in self.prefill_batch_buckets for width in self.chunk_buckets
                if rows == 1 or rows * width <= self.prefill_budget]

    @property
    def step_shapes(self) -> list[tuple[int, int]]:
        """Every input shape the compiled step can see: decode [B, 1] and the prefill shapes."""
        return [(b, 1) for b in self.batch_buckets] + self.prefill_shapes

    def warmup(self, threads: Optional[int] = None) -> None:
        """Compile every shape of the step and the sampler now, so no request waits for a
        compilation: each is traced on this thread and compiled on one of `threads` (default:
        one per shape, at most the CPU count), as XLA compiles in parallel; the calls then find
        them compiled."""
        lowered = []
        for rows, width in self.step_shapes:
            arguments = self._step_arguments(np.zeros((rows, width), np.int32), np.full((rows, width), -1, np.int32),
                                             np.zeros((rows, self.allocator.max_blocks_per_sequence), np.int32), [])
            lowered.append(self._step.lower(*arguments))
        logits = lowered[0].out_info[1]  # [B, V] in the dtype the step returns
        for rows in sorted({rows for rows, _ in self.step_shapes}):
            lowered.append(self._sample.lower(jax.ShapeDtypeStruct((rows, logits.shape[1]), logits.dtype),
                                              self._sampling_arguments([], rows), self._token_buffer,
                                              np.zeros((rows,), np.int32)))
        workers = threads or max(1, min(len(lowered), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jint8-compile") as pool:
            list(pool.map(lambda computation: computation.compile(), lowered))

    @property
    def load(self) -> dict:
        return dict(waiting=self._queued, running=len(self._prefilling) + len(self._decoding),
                    blocks_used=self.allocator.used_blocks, free_blocks=self.allocator.free_blocks)

    # ------------------------------------------------------------------ the engine thread
    @property
    def _token_capacity(self) -> int:
        capacity = self.allocator.usable_blocks * self.allocator.block_size
        limit = self.config.max_tokens_in_flight
        return capacity if limit is None else min(capacity, limit)

    def _run(self) -> None:
        while True:
            self._take_inbox()
            if self._stopping and self._cancel_on_stop:
                for sequence in list(self._by_id.values()):
                    self._finish(sequence, "abort")
            if not self._by_id:
                if self._stopping:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            started, self._waited, self._dispatching = time.perf_counter(), 0.0, 0.0
            kind = "prefill" if self._waiting or self._prefilling else "decode"
            try:
                self._iteration()
            except Exception:  # a failed step poisons the donated pools: end every request, start clean
                logger.exception("engine step failed; ending the requests in flight")
                self._in_flight.clear()
                for sequence in list(self._by_id.values()):
                    self._finish(sequence, "abort")
                self.k_pool, self.v_pool = init_paged_pool(self.model.config, self.allocator.num_blocks,
                                                           self.allocator.block_size, self._pool_dtype)
                self._token_buffer = jnp.zeros((self.config.max_batch,), jnp.int32)
                self._decode_inputs = None
            self.metrics.iterations.labels(kind=kind).inc()
            self.metrics.host_seconds.labels(kind=kind).inc(time.perf_counter() - started - self._waited)
            self.metrics.dispatch_seconds.labels(kind=kind).inc(self._dispatching)
            self.metrics.set_load(self._queued, len(self._prefilling) + len(self._decoding),
                                  self.allocator.used_blocks)

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Sequence):
                self._by_id[item.id] = item
                self._waiting.append(item)
            elif item[0] in self._by_id:
                self._finish(self._by_id[item[0]], item[1])

    def _iteration(self) -> None:
        """Dispatch this iteration's calls, then deliver the tokens of every call before the last
        one: the device runs that one while this thread delivers and prepares the next
        iteration. An iteration with nothing to dispatch (every running sequence's last token
        is in flight) delivers everything."""
        self._admit()
        dispatched = False
        if self._prefilling:
            dispatched |= self._prefill_step()
        if self._decoding:
            dispatched |= self._decode_step()
        self._deliver_in_flight(keep=1 if dispatched else 0)

    def _deliver_in_flight(self, keep: int) -> None:
        """Deliver the calls in flight but the last `keep`. A call's tokens all arrive at once, so
        they share one arrival time, and its metrics are updated once per call, not per token."""
        while len(self._in_flight) > keep:
            call = self._in_flight.popleft()
            waiting = time.perf_counter()
            tokens = np.asarray(call.tokens).tolist()  # the iteration's one wait for the device
            now = time.perf_counter()
            self._waited += now - waiting
            first_token_s, inter_token_s = [], []
            for sequence, token in zip(call.receivers, tokens):
                # a sequence that ended meanwhile (a stop token, cancel) drops what it was dispatched
                if sequence is not None and sequence.id in self._by_id:
                    if sequence.generated:
                        inter_token_s.append(now - sequence.last_token_time)
                    else:
                        first_token_s.append(now - sequence.arrival)
                    self._emit(sequence, token, now)
            self.metrics.ttft.observe_many(first_token_s)
            self.metrics.itl.observe_many(inter_token_s)
            self.metrics.generation_tokens.inc(len(first_token_s) + len(inter_token_s))

    def _admit(self) -> None:
        while self._waiting and len(self._prefilling) + len(self._decoding) < self.config.max_batch:
            sequence = self._waiting[0]
            worst_case = len(sequence.prompt) + sequence.options.max_tokens
            if (not self.allocator.can_reserve(worst_case)
                    or self._reserved_tokens + worst_case > self._token_capacity):
                return  # first come, first served: later requests wait behind this one
            self._waiting.popleft()
            with self._lock:
                self._queued -= 1
            self.allocator.reserve(sequence.id, worst_case)
            self._reserved_tokens += worst_case
            sequence.slot = self._free_slots.pop()
            self._prefilling.append(sequence)

    def _plan_prefill(self) -> list[tuple[_Sequence, int]]:
        """This iteration's prefill rows, (sequence, prompt tokens), oldest prompt first. The first
        row takes up to min(prefill_chunk, budget) tokens; each further row joins while the call's
        compiled area (row bucket x chunk bucket) stays within prefill_tokens_per_step, its chunk
        cut to the widest bucket that keeps it there. Several short prompts start in one call, a
        long one is spread over several iterations, and running streams wait for at most one
        call of that size between two of their tokens."""
        budget, chunk = self.prefill_budget, self.config.prefill_chunk
        rows: list[tuple[_Sequence, int]] = []
        widest = 0
        for sequence in self._prefilling[: self.prefill_batch]:
            remaining = len(sequence.prompt) - sequence.computed
            if not rows:
                count = min(remaining, chunk, budget)
            else:
                row_bucket = bucket_for(len(rows) + 1, self.prefill_batch_buckets)
                fitting = [w for w in self.chunk_buckets if w >= widest and row_bucket * w <= budget]
                if not fitting:
                    break  # a later prompt would not fit either: first come, first served
                count = min(remaining, chunk, fitting[-1])
            rows.append((sequence, count))
            widest = bucket_for(max(widest, count), self.chunk_buckets)
        return rows

    def _prefill_step(self) -> bool:
        """Dispatch one [P, T] call over the planned rows, each left-padded so that its last real
        token is the last column (the head computes that position only), with its own positions
        and block table; padding rows and columns have position -1. Rows whose prompt is done
        leave their first token in their slot and join the decoding sequences."""
        plan = self._plan_prefill()
        rows = bucket_for(len(plan), self.prefill_batch_buckets)
        width = bucket_for(max(count for _, count in plan), self.chunk_buckets)
        ids = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        tables = np.zeros((rows, self.allocator.max_blocks_per_sequence), np.int32)
        call_rows = []
        for row, (sequence, count) in enumerate(plan):
            start = sequence.computed
            ids[row, width - count:] = sequence.prompt[start:start + count]
            positions[row, width - count:] = np.arange(start, start + count)
            self.allocator.ensure(sequence.id, start + count)
            tables[row] = self.allocator.table(sequence.id)
            call_rows.append((sequence, -1, sequence if start + count == len(sequence.prompt) else None))
        self._dispatch(ids, positions, tables, call_rows)
        self.metrics.prefill_sequences.observe(len(plan))
        self.metrics.prompt_tokens.inc(sum(count for _, count in plan))
        for sequence, count in plan:
            sequence.computed += count
            if sequence.computed == len(sequence.prompt):
                sequence.sampled = 1
                # the rest of its reservation now: its block table stays fixed while it decodes,
                # so the decode inputs can stay on the device from step to step (_decode_step)
                self.allocator.ensure(sequence.id, len(sequence.prompt) + sequence.options.max_tokens)
                self._prefilling.remove(sequence)
                self._decoding.append(sequence)
        return True

    def _decode_step(self) -> bool:
        """Dispatch one [B, 1] step of every decoding sequence that has tokens to go, its input
        the token its last call left in its slot (on the device: none of it crosses the host).
        A decoding sequence's block table and slot do not change, so while the same sequences
        decode the step's ids, tables and slots stay on the device and only the positions go
        over."""
        running = [s for s in self._decoding if s.sampled < s.options.max_tokens]
        if not running:
            return False
        rows = bucket_for(len(running), self.batch_buckets)
        positions = np.full((rows, 1), -1, np.int32)
        positions[: len(running), 0] = [sequence.computed for sequence in running]
        members = tuple(sequence.id for sequence in running) + (rows,)
        if self._decode_inputs is None or self._decode_inputs[0] != members:
            tables = np.zeros((rows, self.allocator.max_blocks_per_sequence), np.int32)
            for row, sequence in enumerate(running):
                tables[row] = self.allocator.table(sequence.id)
            ids, slots = np.zeros((rows, 1), np.int32), self._slots([(s, s.slot, s) for s in running], rows)
            started = time.perf_counter()
            self._decode_inputs = (members, *jax.device_put((ids, tables, slots)))
            self._dispatching += time.perf_counter() - started
        _, ids, tables, slots = self._decode_inputs
        self._dispatch(ids, positions, tables, [(s, s.slot, s) for s in running], slots)
        for sequence in running:
            sequence.computed += 1
            sequence.sampled += 1
        return True

    def _slots(self, rows: list, size: int) -> TokenSlots:
        """rows: (sequence, read slot, receiver or None) per real row, padded to size rows (their
        tokens dropped)."""
        pad = size - len(rows)
        dropped = self.config.max_batch  # out of the buffer's range
        return TokenSlots(read=np.asarray([read for _, read, _ in rows] + [-1] * pad, np.int32),
                          write=np.asarray([dropped if r is None else r.slot for _, _, r in rows] + [dropped] * pad,
                                           np.int32))

    def _step_arguments(self, ids, positions, tables, rows: list, slots: Optional[TokenSlots] = None) -> tuple:
        """The step's arguments; rows as _slots takes them (slots: already built for them)."""
        slots = self._slots(rows, ids.shape[0]) if slots is None else slots
        return (self.params, self.k_pool, self.v_pool, self._token_buffer, ids, positions, tables, slots)

    @staticmethod
    def _sampling_arguments(sequences: list, size: int) -> RowSampling:
        """The sampler's per-row controls for these sequences, padded to size rows (greedy, filters off)."""
        pad = size - len(sequences)

        def column(values, dtype, fill=0):
            return np.asarray(list(values) + [fill] * pad, dtype)

        return RowSampling(
            temperature=column((s.options.temperature for s in sequences), np.float32),
            top_k=column((s.options.top_k for s in sequences), np.int32),
            top_p=column((s.options.top_p for s in sequences), np.float32, 1.0),
            seed=column((s.seed for s in sequences), np.uint32),
            counter=column((s.sampled for s in sequences), np.int32))

    def _dispatch(self, ids, positions, tables, rows: list, slots: Optional[TokenSlots] = None) -> None:
        """Queue one call on the device (it runs while this thread goes on), and the sampler
        after it when a row samples, and its tokens' delivery; the device-to-host copy of its
        tokens starts at once."""
        arguments = self._step_arguments(ids, positions, tables, rows, slots)
        started = time.perf_counter()
        tokens, logits, self.k_pool, self.v_pool, self._token_buffer = self._step(*arguments)
        self._dispatching += time.perf_counter() - started
        sequences = [sequence for sequence, _, _ in rows]
        if any(sequence.options.temperature > 0 for sequence in sequences):
            sampling = self._sampling_arguments(sequences, ids.shape[0])
            started = time.perf_counter()
            tokens, self._token_buffer = self._sample(logits, sampling, self._token_buffer, arguments[-1].write)
            self._dispatching += time.perf_counter() - started
        tokens.copy_to_host_async()
        self._in_flight.append(_InFlight(tokens, [receiver for _, _, receiver in rows]))

    def _emit(self, sequence: _Sequence, token: int, now: float) -> None:
        """Hand one token to its request (its metrics are the caller's: _deliver_in_flight)."""
        sequence.last_token_time = now
        sequence.generated.append(token)
        if token in self.eos_token_ids or token in sequence.options.stop_token_ids:
            reason = "stop"
        elif len(sequence.generated) >= sequence.options.max_tokens:
            reason = "length"
        else:
            reason = None
        if not self._deliver(sequence, [token], reason):
            reason = "abort"
        if reason is not None:
            self._release(sequence, reason)

    @staticmethod
    def _deliver(sequence: _Sequence, tokens: list, reason: Optional[str]) -> bool:
        """Hand tokens to the request's sink; False if the sink failed (its reader is gone)."""
        try:
            sequence.sink(tokens, reason)
            return True
        except Exception:
            logger.exception("request %d: its sink failed; ending the request", sequence.id)
            return False

    def _finish(self, sequence: _Sequence, reason: str) -> None:
        """End a request from outside the decode path (cancel, shutdown, a failed step)."""
        self._deliver(sequence, [], reason)
        self._release(sequence, reason)

    def _release(self, sequence: _Sequence, reason: str) -> None:
        self._by_id.pop(sequence.id, None)
        if sequence in self._waiting:
            self._waiting.remove(sequence)
            with self._lock:
                self._queued -= 1
        else:
            for group in (self._prefilling, self._decoding):
                if sequence in group:
                    group.remove(sequence)
                    self._reserved_tokens -= len(sequence.prompt) + sequence.options.max_tokens
        self.allocator.free(sequence.id)
        if sequence.slot >= 0:
            self._free_slots.append(sequence.slot)
            sequence.slot = -1
        self.metrics.requests.labels(finish_reason=reason).inc()
        self.metrics.e2e.observe(time.perf_counter() - sequence.arrival)
