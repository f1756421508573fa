"""Seed 002's `/performance/report` and `/alerts/active`, and the data behind `/dashboard`.

Everything is computed from the service's own metrics, in the request scope, from the worker:
- per model and version: requests, errors, latency percentiles and prediction distribution from
  `worker.lifecycle.stats` (every replica sharing Redis, the numbers `/v1/metrics/{version}` and
  canary analysis use); a request rate and "recent" figures from the difference with an earlier
  snapshot this worker kept (`Monitor`), since the counts are cumulative;
- traffic splits, shadows, deployments (canaries with their live verdict) and A/B tests (with
  their significance result) from `worker.lifecycle`;
- feature freshness from `feature_oldest_record_timestamp_seconds` (set by the pipelines on each
  feature-store request), the LLM breaker from the LLM itself or its runner's health;
- memory: the container's usage against its cgroup limit when one is set, else this replica's
  processes against the host's RAM.

Alerts apply `AlertSettings`' thresholds (the seeds': p95 > 100 ms, error rate > 1 %, breaker
open, memory > 85 %, feature freshness > 5 min) to the report.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tiffin.context import worker_of
from tiffin.http_errors import endpoint
from tiffin.lifecycle import stats as vm
from tiffin.lifecycle.manager import breach

if TYPE_CHECKING:
    from tiffin.composition import Worker

FRESHNESS_METRIC = "feature_oldest_record_timestamp_seconds"
BREAKER_METRIC = "ml_inference_circuit_breaker_state"
STATIC = Path(__file__).with_name("dashboard")


class AlertSettings(BaseSettings):
    """Alert thresholds and the window recent figures are computed over."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_ALERT_", extra="ignore")

    p95_ms: float = Field(100.0, gt=0)
    """A version whose recent p95 latency exceeds this (ms) raises `high_latency` (seed 002)."""

    error_rate: float = Field(0.01, ge=0, le=1)
    """A version whose recent error rate exceeds this fraction raises `high_error_rate`."""

    memory_fraction: float = Field(0.85, gt=0, le=1)
    """Memory used over the limit (cgroup `memory.max`, else host RAM) past which
    `high_memory` is raised."""

    freshness_s: float = Field(300.0, gt=0)
    """Age (s) of the oldest feature record served past which `stale_features` is raised."""

    min_requests: int = Field(20, ge=1)
    """Requests a version needs in the window before its latency or error rate can alert, so
    that one slow or failed request out of three is not an incident."""

    window_s: float = Field(60.0, gt=0, le=3600)
    """Recent figures (rate, percentiles, error rate) cover about this many seconds, measured
    against the oldest snapshot this worker kept within it."""


@dataclass
class Monitor:
    """One worker's memory for the report: earlier cumulative snapshots (a rate needs two
    points), and the way to the replica's record of when each alert was first seen. Lives on
    the `Worker`, not in a module."""

    settings: AlertSettings = field(default_factory=AlertSettings)
    history: deque[tuple[float, vm.Snapshots]] = field(default_factory=lambda: deque(maxlen=256))
    since: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    replica_dir: str | None = None
    """Where the replica's workers share `since` (default: the replica's Prometheus
    multiprocess directory, read when first needed: BentoML sets it after the worker starts)."""

    def remember(self, now: float, snaps: vm.Snapshots) -> tuple[float, vm.Snapshots] | None:
        """Keeps `snaps` and returns the base of the recent figures: the newest snapshot at least
        a window old, else the oldest one (None: this is the first look)."""
        with self.lock:
            # the newest snapshot past the window stays: with sparse polls, recent figures cover
            # a longer (reported) window rather than falling back to everything since start
            while len(self.history) > 1 and now - self.history[1][0] >= self.settings.window_s:
                self.history.popleft()
            base = self.history[0] if self.history else None
            if not self.history or now - self.history[-1][0] >= 1.0:
                self.history.append((now, snaps))
            return base

    def first_seen(self, active: set[str], now: float) -> dict[str, float]:
        """When each active alert was first seen firing by any worker of this replica (the
        dashboard's polls land on any worker: `since` must not depend on which one answers).
        Without a multiprocess directory (one process), in this object."""
        directory = self.replica_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        with self.lock:
            if not directory:
                self.since = _still_active(self.since, active, now)
                return dict(self.since)
            # a JSON file under an exclusive lock; prometheus_client reads only *.db files here
            fd = os.open(Path(directory, "alerts-first-seen.json"), os.O_RDWR | os.O_CREAT, 0o600)
            with open(fd, "r+") as file:
                fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
                try:
                    since = {str(k): float(v) for k, v in json.loads(file.read() or "{}").items()}
                except (ValueError, AttributeError):  # torn or foreign content: start over
                    since = {}
                since = _still_active(since, active, now)
                file.seek(0)
                file.truncate()
                file.write(json.dumps(since))
            return since


def _still_active(since: dict[str, float], active: set[str], now: float) -> dict[str, float]:
    """Resolved alerts forgotten (firing again later is a new `since`), new ones seen `now`."""
    return {name: since.get(name, now) for name in active}


# --- metrics this replica's workers wrote --------------------------------------------------


def replica_gauges() -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of the two gauges the report reads, over every worker of this replica."""
    from prometheus_client import REGISTRY, CollectorRegistry

    registry: Any = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    out: dict[str, list[tuple[dict[str, str], float]]] = {FRESHNESS_METRIC: [], BREAKER_METRIC: []}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in out:
                out[sample.name].append((dict(sample.labels), float(sample.value)))
    return out


def freshness(samples: list[tuple[dict[str, str], float]], now: float) -> dict[str, Any]:
    """Per model and version, the age of the oldest feature record its last requests used."""
    per: dict[str, dict[str, float]] = {}
    for labels, stamp in samples:
        if stamp > 0 and math.isfinite(stamp):
            versions = per.setdefault(labels.get("model", ""), {})
            key = labels.get("version", "")
            versions[key] = min(versions.get(key, math.inf), stamp)
    models = {
        model: {v: round(max(now - stamp, 0.0), 1) for v, stamp in versions.items()}
        for model, versions in per.items()
    }
    ages = [age for versions in models.values() for age in versions.values()]
    return {"max_age_s": max(ages) if ages else None, "models": models}


# --- memory --------------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def memory() -> dict[str, Any]:
    """The container's usage against its cgroup limit, else this replica's processes (the
    `bentoml serve` process and its children) against the host's RAM."""
    import psutil

    cgroup = Path("/sys/fs/cgroup")
    limit = _read_int(cgroup / "memory.max")
    used = _read_int(cgroup / "memory.current")
    if limit is None:  # cgroup v1
        limit = _read_int(cgroup / "memory" / "memory.limit_in_bytes")
        used = _read_int(cgroup / "memory" / "memory.usage_in_bytes")
    total = psutil.virtual_memory().total
    worker_rss = psutil.Process().memory_info().rss
    if limit is not None and limit < total and used is not None:
        return _memory("cgroup", used, limit, worker_rss)
    owner = os.environ.get("TIFFIN_REPLICA", "").partition(":")[0]
    try:
        root = psutil.Process(int(owner)) if owner.isdigit() else psutil.Process()
        rss = 0
        for proc in (root, *root.children(recursive=True)):
            try:
                rss += proc.memory_info().rss
            except psutil.Error:  # a process that just exited
                continue
    except psutil.Error:
        rss = worker_rss
    return _memory("host", rss, total, worker_rss)


def _memory(source: str, used: int, limit: int, worker_rss: int) -> dict[str, Any]:
    return {
        "source": source,
        "used_bytes": used,
        "limit_bytes": limit,
        "fraction": round(used / limit, 4) if limit else None,
        "worker_rss_bytes": worker_rss,
    }


# --- the LLM breaker -----------------------------------------------------------------------


async def breaker(worker: Worker, gauges: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
    if worker.llm is not None:
        status = worker.llm.breaker.status()
        return {"state": status["state"], "source": "in-process", "detail": status}
    if worker.forwarded_llm is not None:
        health = await worker.forwarded_llm.health()
        state = (health.get("breaker") or {}).get("state")
        return {"state": state or "unknown", "source": "runner", "detail": health}
    worst = max((v for _, v in gauges), default=None)
    names = {0: "closed", 1: "half_open", 2: "open"}
    return {"state": names.get(int(worst), "unknown") if worst is not None else "none"}


# --- the report ----------------------------------------------------------------------------


def _models(worker: Worker) -> list[str]:
    assert worker.families is not None and worker.lifecycle is not None
    return sorted({*worker.families.loaded(), *worker.lifecycle.state.families})


def _version_entry(
    snap: vm.Snapshot, base: vm.Snapshot | None, elapsed: float | None
) -> dict[str, Any]:
    total = vm.summary(snap)
    entry: dict[str, Any] = {"total": total}
    if base is not None and elapsed:
        recent = vm.summary(vm.delta(snap, base))
        recent["rate_per_s"] = round(recent["requests"] / elapsed, 3)
        recent["window_s"] = round(elapsed, 1)
        entry["recent"] = recent
    else:  # the first look of this worker: since start, no rate yet
        entry["recent"] = {**total, "rate_per_s": None, "window_s": None}
    return entry


@dataclass(frozen=True)
class Traffic:
    """A model's routing as the lifecycle applies it."""

    weights: dict[str, int]
    shadows: tuple[str, ...] = ()
    stable: str | None = None


def model_stats(
    snaps: vm.Snapshots,
    base: tuple[float, vm.Snapshots] | None,
    now: float,
    traffic: dict[str, Traffic],
) -> dict[str, Any]:
    """Per model and version: cumulative statistics (`total`) and those since `base` (`recent`,
    with a request rate), with each version's weight."""
    elapsed = now - base[0] if base is not None else None
    models: dict[str, Any] = {}
    for model, versions in snaps.items():
        route = traffic.get(model) or Traffic({})
        weights = route.weights
        earlier = base[1].get(model, {}) if base is not None else {}
        models[model] = {
            "weights": weights,
            "shadows": list(route.shadows),
            "stable": route.stable or max(weights, key=weights.__getitem__, default=None),
            "versions": {
                v: {
                    "weight": weights.get(v, 0),
                    "shadow": v in route.shadows,
                    **_version_entry(
                        versions.get(v) or vm.empty(),
                        (earlier.get(v) or vm.empty()) if base is not None else None,
                        elapsed,
                    ),
                }
                for v in sorted({*versions, *weights, *route.shadows})
            },
        }
    return models


def performance(worker: Worker, now: float) -> dict[str, Any]:
    """Per model and version statistics, traffic, deployments and A/B tests (blocking: reads
    other replicas' counts from Redis; call it off the event loop)."""
    lifecycle = worker.lifecycle
    assert lifecycle is not None
    names = _models(worker)
    snaps = {model: lifecycle.stats.snapshot(model) for model in names}
    traffic = {
        m: Traffic(lifecycle.weights(m), lifecycle.shadows(m), lifecycle.stable(m)) for m in names
    }
    base = worker.monitor.remember(now, snaps)
    return {
        "generated_at": now,
        "models": model_stats(snaps, base, now, traffic),
        "deployments": [
            _deployment(worker, d) for d in reversed(lifecycle.state.deployments[-20:])
        ],
        "ab_tests": [_ab_test(worker, t) for t in lifecycle.state.ab_tests.values()],
    }


def _deployment(worker: Worker, d: Any) -> dict[str, Any]:
    out = d.model_dump(exclude={"baseline", "transitions"})
    out["weight"] = d.steps[min(d.step_index, len(d.steps) - 1)]
    if d.status == "in_progress" and d.strategy in ("canary", "rolling"):
        assert worker.lifecycle is not None
        now = worker.lifecycle.stats.snapshot(d.family, [d.target_version, d.stable_version])
        canary = vm.delta(now.get(d.target_version, vm.empty()), d.baseline.get(d.target_version))
        stable = vm.delta(now.get(d.stable_version, vm.empty()), d.baseline.get(d.stable_version))
        problem = breach(canary, stable, d.thresholds)
        samples = int(canary["ok"] + canary["error"])
        if problem:
            out["verdict"] = f"breaching: {problem}"
        elif samples < d.thresholds.min_samples:
            out["verdict"] = f"collecting ({samples}/{d.thresholds.min_samples} requests)"
        else:
            out["verdict"] = "healthy"
    elif d.status == "rolled_back":
        out["verdict"] = f"rolled back: {d.reason}"
    else:
        out["verdict"] = d.status
    return out


def _ab_test(worker: Worker, test: Any) -> dict[str, Any]:
    assert worker.lifecycle is not None
    result = worker.lifecycle.ab_result(test)
    out = test.model_dump(exclude={"baseline", "final_result"})
    out["result"] = result
    out["verdict"] = result.get("conclusion")
    return out


async def report(worker: Worker) -> dict[str, Any]:
    """`/performance/report`: performance, feature freshness, breaker, memory."""
    settings = worker.monitor.settings
    now = time.time()
    body = await anyio.to_thread.run_sync(performance, worker, now)
    gauges = await anyio.to_thread.run_sync(replica_gauges)
    body["feature_freshness"] = freshness(gauges[FRESHNESS_METRIC], now)
    body["circuit_breaker"] = await breaker(worker, gauges[BREAKER_METRIC])
    body["memory"] = await anyio.to_thread.run_sync(memory)
    body["thresholds"] = settings.model_dump()
    return body


def alerts(body: dict[str, Any], settings: AlertSettings) -> list[dict[str, Any]]:
    """The active alerts of a report (without `since`, which `Monitor.first_seen` adds)."""
    found: list[dict[str, Any]] = []

    def add(name: str, severity: str, value: Any, threshold: Any, message: str, **labels: str):
        found.append(
            {
                "id": ":".join([name, *labels.values()]),
                "name": name,
                "severity": severity,
                "value": value,
                "threshold": threshold,
                "message": message,
                **labels,
            }
        )

    for model, entry in body["models"].items():
        for version, stats in entry["versions"].items():
            recent = stats["recent"]
            if recent["requests"] < settings.min_requests:
                continue
            p95 = recent["latency_ms"]["p95"]
            if p95 is not None and p95 > settings.p95_ms:
                add(
                    "high_latency",
                    "warning",
                    p95,
                    settings.p95_ms,
                    f"{model}:{version} p95 latency {p95} ms > {settings.p95_ms} ms",
                    model=model,
                    version=version,
                )
            rate = recent["error_rate"]
            if rate is not None and rate > settings.error_rate:
                add(
                    "high_error_rate",
                    "critical",
                    rate,
                    settings.error_rate,
                    f"{model}:{version} error rate {rate:.2%} > {settings.error_rate:.2%}",
                    model=model,
                    version=version,
                )
    state = body["circuit_breaker"]["state"]
    if state == "open":
        add("circuit_breaker_open", "critical", state, "closed", "the LLM circuit breaker is open")
    fraction = body["memory"]["fraction"]
    if fraction is not None and fraction > settings.memory_fraction:
        add(
            "high_memory",
            "warning",
            fraction,
            settings.memory_fraction,
            f"memory at {fraction:.0%} of {body['memory']['source']} limit",
        )
    for model, versions in body["feature_freshness"]["models"].items():
        for version, age in versions.items():
            if age > settings.freshness_s:
                add(
                    "stale_features",
                    "warning",
                    age,
                    settings.freshness_s,
                    f"{model}:{version} served features {age:.0f} s old",
                    model=model,
                    version=version,
                )
    return found


async def active_alerts(worker: Worker) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    body = await report(worker)
    found = alerts(body, worker.monitor.settings)
    since = worker.monitor.first_seen({a["id"] for a in found}, body["generated_at"])
    for alert in found:
        alert["since"] = since[alert["id"]]
    return body, found


# --- routes --------------------------------------------------------------------------------


async def performance_report(request: Request) -> dict[str, Any]:
    return await report(worker_of(request))


async def alerts_active(request: Request) -> dict[str, Any]:
    _, found = await active_alerts(worker_of(request))
    return {"alerts": found, "count": len(found)}


async def dashboard_data(request: Request) -> dict[str, Any]:
    body, found = await active_alerts(worker_of(request))
    return {**body, "alerts": found, "drift_served": _serves_drift(request)}


def _serves_drift(request: Request) -> bool:
    """Whether this application has a `/drift/{model}` route: the page asks it only then, so a
    bundle without drift shows "no drift data" rather than a 404 per model and poll."""
    router = request.scope.get("router")
    return any(
        getattr(route, "path", "").startswith("/drift/") for route in getattr(router, "routes", ())
    )


async def dashboard_page(request: Request) -> Response:
    name = request.path_params.get("asset") or "index.html"
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        return Response("Not Found", status_code=404, media_type="text/plain")
    return FileResponse(path, headers={"Cache-Control": "no-cache"})


routes = [
    Route("/performance/report", endpoint(performance_report), methods=["GET"]),
    Route("/alerts/active", endpoint(alerts_active), methods=["GET"]),
    Route("/dashboard/data", endpoint(dashboard_data), methods=["GET"]),
    Route("/dashboard", dashboard_page, methods=["GET"]),
    Route("/dashboard/{asset}", dashboard_page, methods=["GET"]),
]
"""Tabular workers' monitoring routes."""
