"""Prometheus metrics with the seeds' names, every one labelled by model name and version.

Created lazily: BentoML sets PROMETHEUS_MULTIPROC_DIR in each worker after importing the service
module, and a metric created before that would be invisible on the shared `/metrics`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from tiffin.feature_store import EntityColumns

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FRESHNESS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 86400)
MEMORY_SAMPLE_S = 5.0


@dataclass(frozen=True)
class Metrics:
    requests: Counter
    duration: Histogram
    errors: Counter
    load_time: Gauge
    active_models: Gauge
    feature_fetch: Histogram
    scores: Histogram
    batch_size: Histogram
    feature_age: Histogram
    memory_rss: Gauge
    memory_limit: Gauge
    stages: Histogram
    feature_oldest: Gauge


@lru_cache
def metrics() -> Metrics:
    created = _create()
    _start_memory_sampler(created)
    return created


def _create() -> Metrics:
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
        # Seed 003's batch sizes; also what the dashboard plots per model.
        batch_size=Histogram(
            "ml_inference_batch_size",
            "Rows scored per inference call",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
        ),
        # Seed 001's SLA "feature freshness < 5 minutes": age of the oldest record a row used.
        feature_age=Histogram(
            "feature_freshness_seconds",
            "Age of the oldest feature record behind each scored row",
            ["model", "version"],
            buckets=FRESHNESS_BUCKETS,
        ),
        # The seeds' "memory > 85%" alert, from inside the pod: prometheus_client's process
        # collector is off in multiprocess mode, and cAdvisor is not always scraped.
        memory_rss=Gauge(
            "tiffin_process_resident_memory_bytes",
            "Resident memory of the serving workers (summed over live workers)",
            multiprocess_mode="livesum",
        ),
        memory_limit=Gauge(
            "tiffin_memory_limit_bytes",
            "Memory the container may use: its cgroup limit, else the machine's memory",
            multiprocess_mode="livemax",
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
STAGE_SAMPLE = 8
"""Stage times are recorded for one request in this many per worker: the distribution is what
matters, and four histogram observations on every request cost more than the routing they time."""


@dataclass(frozen=True)
class VersionMetrics:
    """One model version's labelled metric children. `labels()` validates and hashes its
    arguments on every call; a scoring request records up to ten values."""

    success: Any
    error: Any
    duration: Any
    scores: Any
    batch_size: Any
    feature_age: Any
    feature_oldest: Any
    stages: tuple[Any, ...]


@lru_cache(maxsize=4096)
def of_version(model: str, version: str) -> VersionMetrics:
    m = metrics()
    return VersionMetrics(
        success=m.requests.labels(model, version, "success"),
        error=m.requests.labels(model, version, "error"),
        duration=m.duration.labels(model, version),
        scores=m.scores.labels(model, version),
        batch_size=m.batch_size.labels(model, version),
        feature_age=m.feature_age.labels(model, version),
        feature_oldest=m.feature_oldest.labels(model, version),
        stages=tuple(m.stages.labels(model, version, stage) for stage in STAGES),
    )


@lru_cache(maxsize=4096)
def feature_fetch(model: str, version: str, backend: str) -> Any:
    return metrics().feature_fetch.labels(model, version, backend)


@dataclass
class Observation:
    """Records one scoring call in the seeds' metrics, labelled by the version that answered."""

    model: str
    version: str
    started: float
    rows: int = 1

    def done(self, scores: np.ndarray | None = None) -> None:
        m = of_version(self.model, self.version)
        m.success.inc()
        m.batch_size.observe(self.rows)
        m.duration.observe(time.perf_counter() - self.started)
        if scores is not None:
            observe_many(m.scores, np.asarray(scores))

    def failed(self, kind: str) -> None:
        of_version(self.model, self.version).error.inc()
        metrics().errors.labels(self.model, self.version, kind).inc()

    def stages(self, *seconds: float) -> None:
        """Seconds spent in each of `STAGES`, in order (callers sample: see STAGE_SAMPLE)."""
        for child, spent in zip(of_version(self.model, self.version).stages, seconds, strict=True):
            child.observe(spent)


def memory_limit_bytes() -> int:
    """cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`, else physical memory."""
    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            return min(int(raw), total)  # v1 reports a huge number when unlimited
    return total


def _start_memory_sampler(m: Metrics) -> None:
    """Samples this worker's RSS every few seconds into the shared gauges, from the moment the
    worker's metrics exist (a daemon thread: it must not keep a worker alive)."""
    process, limit = psutil.Process(os.getpid()), memory_limit_bytes()

    def sample() -> None:
        while True:
            m.memory_rss.set(process.memory_info().rss)
            m.memory_limit.set(limit)
            threading.Event().wait(MEMORY_SAMPLE_S)

    threading.Thread(target=sample, name="tiffin-memory", daemon=True).start()


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
        of_version(model, version).feature_oldest.set(oldest)


def exposition() -> tuple[bytes, str]:
    """Every worker's metrics of this server as Prometheus text, and its content type: the
    multiprocess directory's when BentoML set one (each replica's own, tiffin/replica.py)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
