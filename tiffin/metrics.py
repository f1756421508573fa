"""Prometheus metrics with the seeds' names, every one labelled by model name and version.

Created lazily: BentoML sets PROMETHEUS_MULTIPROC_DIR in each worker after importing the service
module, and a metric created before that would be invisible on the shared `/metrics`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from tiffin.feature_store import EntityColumns

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))


@dataclass(frozen=True)
class Metrics:
    requests: Counter
    duration: Histogram
    errors: Counter
    load_time: Gauge
    active_models: Gauge
    feature_fetch: Histogram
    scores: Histogram
    stages: Histogram
    feature_oldest: Gauge


@lru_cache
def metrics() -> Metrics:
    return Metrics(
        requests=Counter(
            "ml_inference_requests_total",
            "Inference requests by model, version and status",
            ["model", "version", "status"],
        ),
        duration=Histogram(
            "ml_inference_duration_seconds",
            "Inference latency (features + model + encoding)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
        ),
        errors=Counter(
            "ml_inference_errors_total",
            "Inference errors by model, version and type",
            ["model", "version", "type"],
        ),
        load_time=Gauge(
            "ml_model_load_time_seconds",
            "Time to load and warm up a model version",
            ["model", "version"],
            multiprocess_mode="livemax",
        ),
        active_models=Gauge(
            "ml_active_models",
            "1 for every model version loaded and serving",
            ["model", "version"],
            multiprocess_mode="livemax",
        ),
        feature_fetch=Histogram(
            "feature_fetch_duration_seconds",
            "Feature store lookup latency per request",
            ["model", "version", "backend"],
            buckets=LATENCY_BUCKETS,
        ),
        scores=Histogram(
            "prediction_scores",
            "Distribution of predicted scores",
            ["model", "version"],
            buckets=SCORE_BUCKETS,
        ),
        stages=Histogram(
            "ml_pipeline_stage_seconds",
            "Time in each stage of the request pipeline: route, features, predict, respond",
            ["model", "version", "stage"],
            buckets=LATENCY_BUCKETS,
        ),
        # A timestamp rather than an age: it stays true between requests (age = now - value,
        # `time() - feature_oldest_record_timestamp_seconds` in PromQL), and the oldest record
        # over the workers is what a freshness alert is about (livemin).
        feature_oldest=Gauge(
            "feature_oldest_record_timestamp_seconds",
            "When the oldest feature-store record the last request of a worker used was written",
            ["model", "version"],
            multiprocess_mode="livemin",
        ),
    )


STAGES = ("route", "features", "predict", "respond")


@lru_cache(maxsize=4096)
def _stage_children(model: str, version: str) -> tuple[Histogram, ...]:
    # `labels()` validates and hashes its arguments on every call; a request records four stages.
    stages = metrics().stages
    return tuple(stages.labels(model, version, stage) for stage in STAGES)


@dataclass
class Observation:
    """Records one scoring call in the seeds' metrics, labelled by the version that answered."""

    model: str
    version: str
    started: float

    def done(self, scores: np.ndarray | None = None) -> None:
        m = metrics()
        m.requests.labels(self.model, self.version, "success").inc()
        m.duration.labels(self.model, self.version).observe(time.perf_counter() - self.started)
        if scores is not None:
            observe_many(m.scores.labels(self.model, self.version), np.asarray(scores))

    def failed(self, kind: str) -> None:
        m = metrics()
        m.requests.labels(self.model, self.version, "error").inc()
        m.errors.labels(self.model, self.version, kind).inc()

    def stages(self, *seconds: float) -> None:
        """Seconds spent in each of `STAGES`, in order."""
        for child, spent in zip(_stage_children(self.model, self.version), seconds, strict=True):
            child.observe(spent)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every value, as one increment per touched bucket.

    A 256-row batch would otherwise cost 256 observes (~1 ms of a ~6 ms batch). prometheus_client
    has no bulk API, so this uses its per-bucket values, the ones `observe` itself increments
    (a test checks the result against `observe` one value at a time).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size <= 1:
        for value in values.tolist():
            histogram.observe(value)
        return
    bounds = np.asarray(histogram._upper_bounds)  # ends with +Inf
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=bounds.size)
    histogram._sum.inc(float(values.sum()))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=False):
        if count:
            bucket.inc(count)


def observe_feature_age(model: str, version: str, columns: Iterable[EntityColumns]) -> None:
    """Sets `feature_oldest` to the oldest `written_at` of the records a request used (NaN:
    not found, skipped); one `set` per request, nothing when no record was found."""
    oldest = math.inf
    for column in columns:
        stamps = column.written_at
        if stamps.size:
            first = float(np.fmin.reduce(stamps))  # NaN only when no record of this kind was found
            if first < oldest:
                oldest = first
    if oldest != math.inf:
        metrics().feature_oldest.labels(model, version).set(oldest)
