"""`/performance/report` and `/alerts/active` computed from real Prometheus metrics: requests
recorded with the pipelines' own `Observation`, feature ages with the pipelines' own
`observe_feature_age`, read back the way the report reads them, judged with the seeds'
thresholds."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from tiffin import monitoring as mon
from tiffin.composition import Worker
from tiffin.feature_store import EntityColumns
from tiffin.lifecycle import stats as vm
from tiffin.metrics import Observation, observe_feature_age
from tiffin.settings import ServerSettings

SETTINGS = mon.AlertSettings()


def record(model: str, version: str, n: int, seconds: float, failed: int = 0) -> None:
    """`n` successful requests that each took `seconds`, and `failed` failed ones."""
    for _ in range(n):
        Observation(model, version, time.perf_counter() - seconds).done(np.asarray([0.7]))
    for _ in range(failed):
        Observation(model, version, time.perf_counter()).failed("TestError")


def snapshot(model: str) -> vm.Snapshots:
    return vm.collect(REGISTRY.collect(), model)


def body(
    models: dict[str, Any],
    freshness: dict[str, Any] | None = None,
    breaker: str = "closed",
    memory: float = 0.5,
) -> dict[str, Any]:
    return {
        "models": models,
        "feature_freshness": freshness or {"max_age_s": None, "models": {}},
        "circuit_breaker": {"state": breaker},
        "memory": {"fraction": memory, "source": "host"},
    }


def alerts_of(report: dict[str, Any], settings: mon.AlertSettings = SETTINGS) -> set[str]:
    return {a["id"] for a in mon.alerts(report, settings)}


@pytest.fixture
def model() -> str:
    return f"mon_{uuid.uuid4().hex[:8]}"  # metrics live for the process: one model per test


def test_p95_over_100ms_alerts_only_the_slow_version_with_enough_requests(model: str) -> None:
    record(model, "slow", 30, 0.2)
    record(model, "fast", 30, 0.004)
    record(model, "few", 5, 0.2)  # under min_requests: one slow burst is not an incident
    stats = mon.model_stats(snapshot(model), None, time.time(), {})
    assert stats[model]["versions"]["slow"]["recent"]["latency_ms"]["p95"] == 250.0
    assert stats[model]["versions"]["fast"]["recent"]["latency_ms"]["p95"] == 5.0
    found = mon.alerts(body(stats), SETTINGS)
    assert [a["id"] for a in found] == [f"high_latency:{model}:slow"]
    assert found[0]["value"] == 250.0 and found[0]["threshold"] == 100.0
    assert found[0]["severity"] == "warning" and found[0]["version"] == "slow"


def test_error_rate_over_one_percent_alerts(model: str) -> None:
    record(model, "bad", 49, 0.001, failed=1)  # 2 %
    record(model, "fine", 100, 0.001, failed=1)  # 0.99 %
    stats = mon.model_stats(snapshot(model), None, time.time(), {})
    assert stats[model]["versions"]["bad"]["recent"]["error_rate"] == 0.02
    found = mon.alerts(body(stats), SETTINGS)
    assert [(a["id"], a["severity"]) for a in found] == [
        (f"high_error_rate:{model}:bad", "critical")
    ]


def test_recent_figures_and_rate_come_from_the_window_not_the_total(model: str) -> None:
    record(model, "v1", 100, 0.2)  # slow, long ago
    monitor = mon.Monitor()
    then = time.time()
    assert monitor.remember(then, snapshot(model)) is None  # first look: no base yet
    record(model, "v1", 40, 0.002)
    now = then + 10
    base = monitor.remember(now, snapshot(model))
    assert base is not None and base[0] == then
    route = {model: mon.Traffic({"v1": 90, "v2": 10}, ("v3",))}
    stats = mon.model_stats(snapshot(model), base, now, route)[model]
    v1 = stats["versions"]["v1"]
    assert v1["total"]["requests"] == 140 and v1["recent"]["requests"] == 40
    assert v1["recent"]["rate_per_s"] == 4.0 and v1["recent"]["window_s"] == 10.0
    assert v1["recent"]["latency_ms"]["p95"] == 2.5  # the old slow requests are out of it
    assert stats["stable"] == "v1" and stats["versions"]["v2"]["weight"] == 10
    assert stats["versions"]["v3"]["shadow"] is True
    assert stats["versions"]["v2"]["total"]["requests"] == 0
    assert alerts_of(body({model: stats})) == set()  # the total's p95 is 250 ms; recent is fine
    # a window later the newest snapshot at least a window old is the base; older ones go
    assert monitor.remember(now + SETTINGS.window_s + 1, snapshot(model))[0] == now  # type: ignore[index]


def columns(*stamps: float) -> EntityColumns:
    n = len(stamps)
    return EntityColumns("card", ["x"] * n, np.zeros((n, 1)), ~np.isnan(stamps), np.asarray(stamps))


def test_feature_freshness_from_the_pipelines_gauge(model: str) -> None:
    now = time.time()
    observe_feature_age(model, "old", [columns(now - 100, math.nan), columns(now - 400)])
    observe_feature_age(model, "new", [columns(now - 30)])
    observe_feature_age(model, "unknown", [columns(math.nan, math.nan)])  # nothing found: no age
    samples = mon.replica_gauges()[mon.FRESHNESS_METRIC]
    fresh = mon.freshness([s for s in samples if s[0]["model"] == model], now)
    ages = fresh["models"][model]
    assert set(ages) == {"old", "new"}
    assert 399 <= ages["old"] <= 401 and 29 <= ages["new"] <= 31
    found = mon.alerts(body({}, fresh), SETTINGS)
    assert [(a["id"], a["threshold"]) for a in found] == [(f"stale_features:{model}:old", 300.0)]


def test_breaker_memory_and_thresholds_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert alerts_of(body({}, breaker="half_open", memory=0.85)) == set()
    assert alerts_of(body({}, breaker="open", memory=0.86)) == {
        "circuit_breaker_open",
        "high_memory",
    }
    monkeypatch.setenv("TIFFIN_ALERT_MEMORY_FRACTION", "0.95")
    assert alerts_of(body({}, memory=0.9), mon.AlertSettings()) == set()
    monkeypatch.setenv("TIFFIN_ALERT_MEMORY_FRACTION", "1.5")
    with pytest.raises(ValueError, match="memory_fraction"):
        mon.AlertSettings()


def test_alerts_keep_the_time_they_were_first_seen() -> None:
    monitor = mon.Monitor()
    assert monitor.first_seen({"a"}, 100.0) == {"a": 100.0}
    assert monitor.first_seen({"a", "b"}, 105.0) == {"a": 100.0, "b": 105.0}
    assert monitor.first_seen({"b"}, 110.0) == {"b": 105.0}  # a resolved
    assert monitor.first_seen({"a", "b"}, 120.0) == {"a": 120.0, "b": 105.0}  # a is new again


def test_workers_of_one_replica_agree_on_since(tmp_path: Path) -> None:
    """Two workers' monitors sharing the replica's directory (as BentoML's workers share its
    multiprocess directory): whichever answers, an alert's `since` is when either first saw it."""
    first, second = mon.Monitor(replica_dir=str(tmp_path)), mon.Monitor(replica_dir=str(tmp_path))
    assert first.first_seen({"a"}, 100.0) == {"a": 100.0}
    assert second.first_seen({"a", "b"}, 130.0) == {"a": 100.0, "b": 130.0}
    assert first.first_seen({"b"}, 140.0) == {"b": 130.0}  # a resolved, for both
    assert second.first_seen({"a", "b"}, 150.0) == {"a": 150.0, "b": 130.0}
    (tmp_path / "alerts-first-seen.json").write_text("[1, 2")  # torn: forgotten, not fatal
    assert first.first_seen({"b"}, 160.0) == {"b": 160.0}


def test_memory_is_measured_against_a_real_limit() -> None:
    memory = mon.memory()
    assert memory["source"] in ("cgroup", "host")
    assert 0 < memory["worker_rss_bytes"] <= memory["used_bytes"] or memory["source"] == "cgroup"
    assert 0 < memory["used_bytes"] < memory["limit_bytes"]
    assert memory["fraction"] == round(memory["used_bytes"] / memory["limit_bytes"], 4)


def test_breaker_state_without_an_llm_comes_from_the_gauge() -> None:
    worker = Worker(server=ServerSettings(), v1_model="")

    def state(samples: list[tuple[dict[str, str], float]]) -> str:
        return asyncio.run(mon.breaker(worker, samples))["state"]

    assert state([({"backend": "b"}, 2.0), ({"backend": "c"}, 0.0)]) == "open"
    assert state([({"backend": "b"}, 0.0)]) == "closed"
    assert state([]) == "none"


def test_the_page_serves_its_own_files_only() -> None:
    from starlette.requests import Request

    def status(asset: str) -> int:
        request = Request({"type": "http", "method": "GET", "path_params": {"asset": asset}})
        return asyncio.run(mon.dashboard_page(request)).status_code

    assert status("app.js") == 200 and status("index.html") == 200
    for outside in ("..", "../monitoring.py", "/etc/passwd", "nope.css", ""):
        assert status(outside) == (200 if outside == "" else 404), outside  # "": the page
