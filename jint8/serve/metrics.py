"""Prometheus metrics of one engine, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from a fast CPU decode step to a long prefill queue.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _powers_of_two(largest: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(max(1, largest).bit_length()))


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
        self.ttft = Histogram("jint8_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jint8_inter_token_latency_seconds", "Between consecutive generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_sequences = Histogram("jint8_prefill_sequences_per_call", "Sequences prefilled in one call",
                                           buckets=_powers_of_two(max_batch), registry=r)
        self.e2e = Histogram("jint8_request_latency_seconds", "Arrival to finish", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.iterations = Counter("jint8_engine_iterations", "Engine iterations that dispatched or delivered a call",
                                  registry=r)
        # against iterations: whether the host keeps up with the device (host work per step)
        self.host_seconds = Counter("jint8_engine_host_seconds",
                                    "Engine thread time in its iterations outside its waits for the device's "
                                    "tokens (scheduling, arguments, dispatch, delivery)", registry=r)
        self._max_batch = max_batch

    def set_load(self, waiting: int, running: int, blocks_used: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.batch_occupancy.set(running / self._max_batch)
        self.kv_blocks_used.set(blocks_used)

    def render(self) -> bytes:
        return generate_latest(self.registry)
