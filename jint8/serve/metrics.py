"""Prometheus metrics of one engine, in a registry of its own (no process-global state)."""

from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Latency buckets from a fast CPU decode step to a long prefill queue.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _powers_of_two(largest: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(max(1, largest).bit_length()))


class BatchHistogram:
    """A Prometheus histogram filled a call's worth of values at a time: observe_many costs a few
    numpy calls for all of a step's tokens, where prometheus_client's Histogram takes a lock and
    a bucket search per value (per token at every decode step, on the engine thread). Exported
    as the same samples (name_bucket{le=...}, name_count, name_sum) by collect()."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry):
        self._name, self._documentation = name, documentation
        self._bounds = np.asarray([*buckets, math.inf], np.float64)  # bucket i: value <= bounds[i]
        self._counts = np.zeros(len(self._bounds), np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()  # collect() runs on the HTTP side
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        if not len(values):
            return
        values = np.asarray(values, np.float64)
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self):
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], [(floatToGoString(b), c) for b, c in zip(self._bounds.tolist(), cumulative)],
                          sum_value=total)
        return [family]

    def describe(self):
        return [HistogramMetricFamily(self._name, self._documentation)]


class ServeMetrics:
    """Counters and histograms the engine updates on its thread; `render()` is the /metrics body."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jint8_requests", "Requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("jint8_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        self.prompt_tokens = Counter("jint8_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("jint8_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("jint8_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("jint8_running_requests", "Requests holding a batch slot", registry=r)
        self.batch_occupancy = Gauge("jint8_batch_occupancy", "Running requests / max batch", registry=r)
        self.kv_blocks_used = Gauge("jint8_kv_cache_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.ttft = BatchHistogram("jint8_time_to_first_token_seconds", "Arrival to first generated token",
                                   _LATENCY_BUCKETS, r)
        self.itl = BatchHistogram("jint8_inter_token_latency_seconds", "Between consecutive generated tokens",
                                  _LATENCY_BUCKETS, r)
        self.prefill_sequences = Histogram("jint8_prefill_sequences_per_call", "Sequences prefilled in one call",
                                           buckets=_powers_of_two(max_batch), registry=r)
        self.e2e = Histogram("jint8_request_latency_seconds", "Arrival to finish", buckets=_LATENCY_BUCKETS,
                             registry=r)
        # kind "prefill": an iteration that began with prompts waiting or prefilling (it may
        # dispatch a prefill call beside the decode step), "decode": decode steps only
        self.iterations = Counter("jint8_engine_iterations", "Engine iterations that dispatched or delivered a call",
                                  ["kind"], registry=r)
        # against iterations: whether the host keeps up with the device (host work per step)
        self.host_seconds = Counter("jint8_engine_host_seconds",
                                    "Engine thread time in its iterations outside its waits for the device's "
                                    "tokens (scheduling, arguments, dispatch, delivery)", ["kind"], registry=r)
        # the part of host_seconds inside JAX's calls: argument transfer and the runtime's launch of
        # the compiled programs (on a GPU, its kernel launches), as against the engine's own Python
        self.dispatch_seconds = Counter("jint8_engine_dispatch_seconds",
                                        "Engine thread time inside the calls that dispatch the compiled step and "
                                        "sampler and put their inputs on the device", ["kind"], registry=r)
        self._max_batch = max_batch

    def set_load(self, waiting: int, running: int, blocks_used: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.batch_occupancy.set(running / self._max_batch)
        self.kv_blocks_used.set(blocks_used)

    def render(self) -> bytes:
        return generate_latest(self.registry)
