"""The server's Prometheus metrics (GET /metrics), in a registry of their own so that
several servers can live in one process (the tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INTER_TOKEN_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


class Metrics:
    """Requests by status, queue and batch sizes, tokens, latencies and cache use, and the
    process's memory and CPU time (process_*)."""

    def __init__(self, num_slots: int):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = Counter(
            "charlm_requests", "Completion requests by HTTP status", ["status"], registry=r
        )
        self.running = Gauge("charlm_requests_running", "Sequences in engine slots", registry=r)
        self.waiting = Gauge("charlm_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.slots = Gauge("charlm_slots", "Engine slots", registry=r)
        self.slots.set(num_slots)
        self.occupancy = Gauge(
            "charlm_slot_occupancy", "Fraction of slots busy at the last engine step", registry=r
        )
        self.prompt_tokens = Counter("charlm_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter("charlm_generated_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "charlm_time_to_first_token_seconds",
            "From arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "charlm_inter_token_latency_seconds",
            "Time per token between a sequence's engine steps",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "charlm_request_latency_seconds",
            "From arrival to the last byte",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "charlm_output_cache_hits", "Completions answered from the output cache", registry=r
        )
        self.cache_misses = Counter(
            "charlm_output_cache_misses",
            "Cacheable completions not in the output cache",
            registry=r,
        )
