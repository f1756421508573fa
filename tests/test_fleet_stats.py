"""Per-version statistics summed over replicas through a real redis-server.

Each "replica" here is what a `bentoml serve` contributes: its own Prometheus registry (real
counters and histograms with Tiffin's metric names) and a `FleetStats` publishing it. Restarts,
crashes and pauses are what they look like from Redis: a new replica id starting from zero, a
replica that stops publishing, a replica that publishes again after it was retired.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram

from tests.conftest import REPO, RedisServer, wait_for
from tiffin.lifecycle import stats as vm
from tiffin.lifecycle.fleet import FleetStats, LocalStats, StatsUnavailable, open_stats
from tiffin.lifecycle.traffic import FileStateBackend, RedisStateBackend, TrafficSettings
from tiffin.metrics import LATENCY_BUCKETS, SCORE_BUCKETS
from tiffin.replica import MetricsSettings, remove_stale_dirs, replica_id, use_own_metrics_dir

MODEL = "card_fraud"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer().start()
    yield server.url
    server.stop()


@pytest.fixture
def prefix(redis_url: str, request: pytest.FixtureRequest) -> str:
    return f"test:{request.node.name}:stats"


class Replica:
    """One serve process's metrics, published under `name`."""

    def __init__(
        self, url: str, prefix: str, name: str, timeout_s: float = 30.0, interval_s: float = 0.05
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ml_inference_requests_total",
            "doc",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ml_inference_duration_seconds",
            "doc",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scores = Histogram(
            "prediction_scores",
            "doc",
            ["model", "version"],
            buckets=SCORE_BUCKETS,
            registry=self.registry,
        )
        settings = MetricsSettings(publish_interval_s=interval_s, replica_timeout_s=timeout_s)
        self.fleet = FleetStats(redis.Redis.from_url(url), prefix, name, settings, self.counts)

    def counts(self) -> vm.Snapshots:
        return vm.collect(self.registry.collect())

    def serve(self, version: str, n: int, ok: bool = True, score: float = 0.2) -> None:
        for _ in range(n):
            self.requests.labels(MODEL, version, "success" if ok else "error").inc()
            self.duration.labels(MODEL, version).observe(0.003)
            if ok:
                self.scores.labels(MODEL, version).observe(score)

    def requests_of(self, version: str) -> int:
        snap = self.fleet.snapshot(MODEL).get(version, vm.empty())
        return int(snap["ok"] + snap["error"])


def test_every_replica_sees_every_replicas_requests(redis_url: str, prefix: str) -> None:
    a, b, c = (Replica(redis_url, prefix, name) for name in ("a", "b", "c"))
    for replica, n in ((a, 70), (b, 20), (c, 10)):
        replica.serve("v2.0", n)
        replica.serve("v1.0", 3 * n)
    b.serve("v2.0", 4, ok=False)
    for replica in (a, b, c):
        replica.fleet.publish()
    for replica in (a, b, c):
        snaps = replica.fleet.snapshot(MODEL)
        assert snaps["v2.0"]["ok"] == 100 and snaps["v2.0"]["error"] == 4
        assert snaps["v1.0"]["ok"] == 300
        assert snaps["v2.0"]["latency"][-1] == 104 and snaps["v2.0"]["score_count"] == 100
        assert replica.fleet.snapshot(MODEL, ["v1.0"]).keys() == {"v1.0"}
    a.serve("v2.0", 5)  # not yet published: a reads its own counts fresh, the others a bit later
    assert a.requests_of("v2.0") == 109 and b.requests_of("v2.0") == 104
    a.fleet.publish()
    assert b.requests_of("v2.0") == c.requests_of("v2.0") == 109


def test_one_worker_per_replica_publishes_on_its_own_thread(redis_url: str, prefix: str) -> None:
    first, second = Replica(redis_url, prefix, "r"), Replica(redis_url, prefix, "r")
    second.fleet.counts = first.counts  # two workers of one replica read the same directory
    second.fleet.worker = "other-worker"
    reader = Replica(redis_url, prefix, "reader")
    first.fleet.start()
    second.fleet.start()
    try:
        first.serve("v1.0", 12)
        wait_for(lambda: reader.requests_of("v1.0") == 12, 5, "the published counts")
        client = redis.Redis.from_url(redis_url)
        workers = (first.fleet.worker.encode(), b"other-worker")
        wait_for(lambda: client.get(f"{prefix}:publisher:r") in workers, 5, "the lease")
    finally:
        first.fleet.stop()
        second.fleet.stop()


def test_records_kept_include_what_other_replicas_just_served(redis_url: str, prefix: str) -> None:
    reader = Replica(redis_url, prefix, "reader")
    busy = Replica(redis_url, prefix, "busy", interval_s=60)  # no periodic publish in this test
    busy.fleet.publish()
    busy.fleet.start()
    try:
        busy.serve("v1.0", 9)
        assert reader.requests_of("v1.0") == 0  # a look: other replicas' counts arrive later
        assert reader.fleet.snapshot(MODEL, fresh=True)["v1.0"]["ok"] == 9  # a record: now
        stuck = Replica(redis_url, prefix, "stuck")  # alive, but its publisher does not answer
        stuck.serve("v1.0", 4)
        stuck.fleet.publish()
        stuck.serve("v1.0", 1)
        started = time.monotonic()
        assert reader.fleet.sync() is False
        assert time.monotonic() - started < 2
        assert reader.requests_of("v1.0") == 13  # the stuck one's last publish counts
    finally:
        busy.fleet.stop()


def test_a_redis_outage_is_an_error_not_a_partial_answer_and_publishing_resumes() -> None:
    server = RedisServer().start()
    a, b = Replica(server.url, "outage", "a"), Replica(server.url, "outage", "b")
    a.fleet.start()
    try:
        a.serve("v1.0", 3)
        wait_for(lambda: b.requests_of("v1.0") == 3, 5, "the first publish")
        server.stop()
        with pytest.raises(StatsUnavailable, match="unavailable"):
            b.fleet.snapshot(MODEL)
        time.sleep(0.3)  # a's publisher fails meanwhile
        server.start()  # empty: nothing was persisted
        a.serve("v1.0", 2)
        wait_for(lambda: b.requests_of("v1.0") == 5, 5, "publishing after the outage")
    finally:
        a.fleet.stop()
        server.stop()


def test_a_restarted_replica_never_lowers_the_totals(redis_url: str, prefix: str) -> None:
    # only the replica that goes silent has a short timeout: a busy CI box may pause the others
    old, other = Replica(redis_url, prefix, "old", 0.3), Replica(redis_url, prefix, "other")
    old.serve("v2.0", 50)
    old.fleet.publish()
    other.fleet.publish()
    baseline = other.fleet.snapshot(MODEL)
    new = Replica(redis_url, prefix, "new")  # the restart: a new id, counting from zero
    new.serve("v2.0", 7)
    new.fleet.publish()
    assert other.requests_of("v2.0") == 57
    time.sleep(0.4)
    assert other.fleet.retire_silent() == ["old"]
    assert other.requests_of("v2.0") == new.requests_of("v2.0") == 57
    since = vm.delta(other.fleet.snapshot(MODEL)["v2.0"], baseline["v2.0"])
    assert since["ok"] == 7 and min(since["latency"]) >= 0


def test_a_dead_replica_is_retired_exactly_once(redis_url: str, prefix: str) -> None:
    dead = Replica(redis_url, prefix, "dead", 0.2)
    dead.serve("v1.0", 40)
    dead.fleet.publish()
    survivors = [Replica(redis_url, prefix, f"s{i}") for i in range(4)]
    time.sleep(0.3)
    retired: list[str] = []

    def retire(replica: Replica) -> None:
        replica.fleet.publish()
        for _ in range(20):
            retired.extend(replica.fleet.retire_silent())

    threads = [threading.Thread(target=retire, args=(s,)) for s in survivors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert retired == ["dead"]
    assert all(s.requests_of("v1.0") == 40 for s in survivors)


def test_a_paused_replica_that_comes_back_is_not_counted_twice(redis_url: str, prefix: str) -> None:
    paused, other = Replica(redis_url, prefix, "p", 0.2), Replica(redis_url, prefix, "o")
    paused.serve("v1.0", 30)
    paused.fleet.publish()
    for extra in (5, 2):  # paused past the timeout twice
        time.sleep(0.3)
        assert other.fleet.retire_silent() == ["p"]
        paused.serve("v1.0", extra)
        assert paused.requests_of("v1.0") == other.requests_of("v1.0") + extra
        paused.fleet.publish()
        assert paused.requests_of("v1.0") == other.requests_of("v1.0")
    assert other.requests_of("v1.0") == 37


RECORD = """
import numpy as np
from tiffin.metrics import metrics, observe_many

m = metrics()
for model in ("card_fraud", "personalization", "ctr_prediction"):
    for i, version in enumerate(("v1", "v2", "v3")):
        for n in range(40 + i):
            m.requests.labels(model, version, "success").inc()
            m.duration.labels(model, version).observe(0.0004 * n)
            m.feature_fetch.labels(model, version, "redis").observe(0.001)
        m.requests.labels(model, version, "error").inc(i)
        m.errors.labels(model, version, "nan").inc(i)
        observe_many(m.scores.labels(model, version), np.linspace(0, 1, 50 + i))
        m.active_models.labels(model, version).set(1)
"""


def test_replica_files_read_what_the_multiprocess_collector_reads(tmp_path: Path) -> None:
    from prometheus_client.multiprocess import MultiProcessCollector

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    for _ in range(2):  # two workers' files (the second records the same again)
        subprocess.run([sys.executable, "-c", RECORD], env=env, cwd=REPO, check=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(tmp_path))
    expected = vm.collect(registry.collect())
    read = vm.ReplicaFiles(str(tmp_path))
    assert read() == expected == read()  # and again, from parsed keys
    assert expected["card_fraud"]["v3"]["ok"] == 84 and expected["card_fraud"]["v3"]["error"] == 4
    assert expected["personalization"]["v2"]["score_count"] == 102
    started = time.perf_counter()
    for _ in range(20):
        read()
    per_read_ms = (time.perf_counter() - started) / 20 * 1000
    print(f"ReplicaFiles: {per_read_ms:.2f} ms per read")


def test_deltas_never_go_negative() -> None:
    big, small = vm.empty(), vm.empty()
    big["ok"], big["latency"][3], big["score_sum"] = 10.0, 4.0, 2.5
    small["ok"] = 4.0
    since = vm.delta(small, big)
    assert since["ok"] == 0 and since["latency"][3] == 0 and since["score_sum"] == 0
    assert vm.delta(big, small)["ok"] == 6


def test_without_redis_each_replica_uses_its_own_counts(tmp_path: Path, redis_url: str) -> None:
    settings = TrafficSettings()
    file_backend = FileStateBackend(str(tmp_path), settings.ack_ttl_s)
    assert isinstance(open_stats(file_backend), LocalStats)
    redis_backend = RedisStateBackend(redis_url, "test:open", settings.ack_ttl_s)
    fleet = open_stats(redis_backend, replica="x")
    assert isinstance(fleet, FleetStats) and fleet.prefix == "test:open:stats"


def _replica_id_in(code: str, worker: bool = True) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if worker:  # BentoML gives its workers the serve's Prometheus directory
        env["PROMETHEUS_MULTIPROC_DIR"] = "/tmp/unused"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO
    ).stdout.strip()


def test_replica_id_is_shared_by_workers_and_new_for_every_serve_process() -> None:
    mine = replica_id()
    assert replica_id() == mine and str(os.getpid()) in mine
    print_id = "from tiffin.replica import replica_id; print(replica_id())"
    assert _replica_id_in(print_id) == mine  # a worker: started by this (serve) process
    # a serve process started by this one (a test run that imported the service): its own id
    assert _replica_id_in(print_id, worker=False) not in ("", mine)
    grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {print_id!r}])"
    other = _replica_id_in(grandchild)  # a process this serve did not start
    assert other and other != mine


def test_each_serve_gets_its_own_prometheus_dir_and_cleans_up_dead_ones(tmp_path: Path) -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml.serving import ensure_prometheus_dir

    host = replica_id().rsplit("-", 2)[0]
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = f"{host}-{os.getppid()}-abcdef"  # another serve on this host, still running
    for name in (running, f"{host}-{finished.pid}-abcdef", "elsewhere-1-abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "counter_1.db").write_bytes(b"x")
    try:
        own = use_own_metrics_dir(MetricsSettings(dir=str(tmp_path)))
        assert Path(ensure_prometheus_dir()) == own == tmp_path / replica_id()
    finally:
        BentoMLContainer.prometheus_multiproc_dir.reset()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [running, "elsewhere-1-abcdef", replica_id()]
    )
    assert (tmp_path / running / "counter_1.db").exists()
    assert remove_stale_dirs(tmp_path, replica_id()) == []
