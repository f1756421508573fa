"""Prometheus metrics of the LLM runner, labelled by model, version (and engine).

Created lazily, like `tiffin.metrics`: BentoML sets PROMETHEUS_MULTIPROC_DIR in each worker after
importing the service module. Gauges say how workers combine (`livesum` for queue depth,
`livemax` for the breaker: the worst worker is what matters).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class LLMMetrics:
    requests: Counter
    duration: Histogram
    tokens: Counter
    tokens_per_second: Histogram
    time_to_first_token: Histogram
    queue_depth: Gauge
    queue_wait: Histogram
    in_flight: Gauge
    structured_failures: Counter
    guard_events: Counter
    prefix_cached_tokens: Counter
    breaker_state: Gauge


@lru_cache
def llm_metrics() -> LLMMetrics:
    return LLMMetrics(
        requests=Counter(
            "llm_requests_total",
            "LLM requests by model, engine, endpoint and outcome",
            ["model", "version", "engine", "endpoint", "status"],
        ),
        duration=Histogram(
            "llm_request_duration_seconds",
            "LLM request latency end to end (queue + prompt + generation)",
            ["model", "version", "engine", "endpoint"],
            buckets=DURATION_BUCKETS,
        ),
        tokens=Counter(
            "llm_tokens_total",
            "Tokens processed, kind=prompt|completion (rate() of completion is tokens/s)",
            ["model", "version", "engine", "kind"],
        ),
        tokens_per_second=Histogram(
            "llm_generation_tokens_per_second",
            "Per-request decode speed: completion tokens after the first / time after the first",
            ["model", "version", "engine"],
            buckets=TPS_BUCKETS,
        ),
        time_to_first_token=Histogram(
            "llm_time_to_first_token_seconds",
            "Request arrival to first generated token (includes queueing and prompt processing)",
            ["model", "version", "engine"],
            buckets=TTFT_BUCKETS,
        ),
        queue_depth=Gauge(
            "llm_queue_depth",
            "Requests waiting for the in-process engine",
            ["model", "version"],
            multiprocess_mode="livesum",
        ),
        queue_wait=Histogram(
            "llm_queue_wait_seconds",
            "Time a request waited in the in-process engine's queue before joining the batch",
            ["model", "version", "engine"],
            buckets=TTFT_BUCKETS,
        ),
        in_flight=Gauge(
            "llm_generations_in_flight",
            "Sequences in the in-process engine's running batch (the batch size)",
            ["model", "version"],
            multiprocess_mode="livesum",
        ),
        structured_failures=Counter(
            "llm_structured_output_failures_total",
            "Structured outputs that failed validation, stage=attempt (retried or re-asked) "
            "or final (the request failed)",
            ["model", "version", "engine", "stage"],
        ),
        guard_events=Counter(
            "llm_guard_events_total",
            "Guard decisions: prompt-injection rule matches (blocked/flagged), sanitized outputs",
            ["rule", "action"],
        ),
        prefix_cached_tokens=Counter(
            "llm_prefix_cached_tokens_total",
            "Prompt tokens taken from the in-process engine's prefix cache instead of processed",
            ["model", "version"],
        ),
        breaker_state=Gauge(
            "ml_inference_circuit_breaker_state",
            "LLM backend circuit breaker: 0 closed, 1 half-open, 2 open (seed 002's metric)",
            ["backend"],
            multiprocess_mode="livemax",
        ),
    )
