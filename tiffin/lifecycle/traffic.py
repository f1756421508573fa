"""Durable, shared traffic state: weights per model family, shadows, deployments and A/B tests.

Every worker (and every replica) reads the same state: from Redis when `REDIS_URL` is set, else
from a directory on local disk shared by the workers of one host. Changes are compare-and-set on a
revision number; each worker acknowledges the revision it is routing with, which is how an admin
call knows a switch has completed everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

T = TypeVar("T")
Strategy = Literal["immediate", "canary", "blue-green", "rolling"]


class TrafficSettings(BaseSettings):
    """Traffic routing and rollout control."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_TRAFFIC_", extra="ignore")

    state_dir: str = ".tiffin/traffic"
    """Where traffic state lives when there is no Redis (shared by the workers of one host)."""

    poll_interval_s: float = Field(0.2, gt=0, le=10)
    """How often each worker checks for a new traffic revision."""

    ack_ttl_s: float = Field(3.0, gt=0)
    """A worker that has not acknowledged for this long is considered gone."""

    switch_timeout_s: float = Field(60.0, gt=0)
    """How long an admin call waits for every worker to acknowledge a change."""

    redis_key: str = "tiffin:traffic"
    """Key prefix of the traffic state in Redis."""


class Thresholds(BaseModel):
    """When a canary is rolled back; checked continuously, not only at window ends."""

    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p99_ms: float | None = Field(250.0, gt=0, description="None: not checked")
    max_p99_ratio: float = Field(3.0, gt=0, description="canary p99 / stable p99")
    max_score_psi: float | None = Field(0.25, gt=0, description="None: not checked")
    min_samples: int = Field(30, ge=1, description="requests before a verdict is drawn")


class Transition(BaseModel):
    at: float = Field(default_factory=time.time)
    event: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Deployment(BaseModel):
    id: str
    family: str
    strategy: Strategy
    target_version: str
    stable_version: str
    steps: list[int]
    step_index: int = 0
    window_s: float
    thresholds: Thresholds
    status: Literal["in_progress", "completed", "rolled_back", "failed"] = "in_progress"
    started_at: float = Field(default_factory=time.time)
    step_started_at: float = Field(default_factory=time.time)
    baseline: dict[str, dict[str, Any]] = Field(default_factory=dict)
    transitions: list[Transition] = Field(default_factory=list)
    reason: str | None = None


class ABTest(BaseModel):
    test_id: str
    family: str
    model_a: str
    model_b: str
    traffic_split: float
    duration_hours: float
    success_metrics: list[str]
    status: Literal["running", "stopped", "completed"] = "running"
    started_at: float = Field(default_factory=time.time)
    stopped_at: float | None = None
    baseline: dict[str, dict[str, Any]] = Field(default_factory=dict)
    previous_weights: dict[str, int] = Field(default_factory=dict)
    final_result: dict[str, Any] | None = None


class FamilyTraffic(BaseModel):
    weights: dict[str, int] = Field(default_factory=dict)
    shadows: list[str] = Field(default_factory=list)
    reload_token: int = 0


class TrafficState(BaseModel):
    revision: int = 0
    families: dict[str, FamilyTraffic] = Field(default_factory=dict)
    deployments: list[Deployment] = Field(default_factory=list)
    ab_tests: dict[str, ABTest] = Field(default_factory=dict)
    events: list[Transition] = Field(default_factory=list)

    def family(self, name: str) -> FamilyTraffic:
        return self.families.setdefault(name, FamilyTraffic())

    def active_deployment(self, family: str) -> Deployment | None:
        return next(
            (d for d in self.deployments if d.family == family and d.status == "in_progress"), None
        )

    def log(self, event: str, **detail: Any) -> None:
        self.events.append(Transition(event=event, detail=detail))
        del self.events[:-500]


class StateBackend(Protocol):
    kind: str

    def load(self) -> TrafficState: ...

    def revision(self) -> int: ...

    def update(self, mutate: Callable[[TrafficState], T]) -> tuple[TrafficState, T]: ...

    def ack(self, worker: str, revision: int) -> None: ...

    def acks(self) -> dict[str, int]: ...

    def try_lead(self, who: str, ttl_s: float) -> bool: ...


class FileStateBackend:
    """State in a JSON file, changed under an exclusive flock; acks are small files with mtimes."""

    kind = "file"

    def __init__(self, directory: str, ack_ttl_s: float) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ack_ttl_s = ack_ttl_s
        self._state = self.dir / "state.json"
        self._lock = self.dir / "state.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self) -> TrafficState:
        try:
            return TrafficState.model_validate_json(self._state.read_bytes())
        except FileNotFoundError:
            return TrafficState()

    def revision(self) -> int:
        try:
            with self._state.open("rb") as handle:
                head = handle.read(64)
        except FileNotFoundError:
            return 0
        # state.json always starts with {"revision":N,...}: a cheap read on the hot polling path
        digits = head.split(b":", 1)[1].split(b",", 1)[0] if b":" in head else b"0"
        return int(digits)

    def update(self, mutate: Callable[[TrafficState], T]) -> tuple[TrafficState, T]:
        with self._locked():
            state = self.load()
            result = mutate(state)
            state.revision += 1
            tmp = self._state.with_suffix(".tmp")
            tmp.write_text(state.model_dump_json())
            os.replace(tmp, self._state)
            return state, result

    def ack(self, worker: str, revision: int) -> None:
        path = self.dir / f"ack-{worker}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(revision))
        os.replace(tmp, path)

    def acks(self) -> dict[str, int]:
        now = time.time()
        out = {}
        for path in self.dir.glob("ack-*"):
            if path.suffix == ".tmp":
                continue
            try:
                if now - path.stat().st_mtime <= self.ack_ttl_s:
                    out[path.name[4:]] = int(path.read_text() or 0)
            except (FileNotFoundError, ValueError):
                continue
        return out

    def try_lead(self, who: str, ttl_s: float) -> bool:
        lease = self.dir / "leader.json"
        with self._locked():
            now = time.time()
            try:
                holder = json.loads(lease.read_text())
            except (FileNotFoundError, ValueError):
                holder = {}
            if holder.get("who") not in (None, who) and holder.get("until", 0) > now:
                return False
            lease.write_text(json.dumps({"who": who, "until": now + ttl_s}))
            return True


class RedisStateBackend:
    """State as one JSON value changed with WATCH/MULTI; acks and the leader lease expire by TTL."""

    kind = "redis"

    def __init__(self, url: str, prefix: str, ack_ttl_s: float) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.prefix = prefix
        self.ack_ttl_ms = int(ack_ttl_s * 1000)

    def load(self) -> TrafficState:
        raw = self.client.get(f"{self.prefix}:state")
        return TrafficState.model_validate_json(raw) if raw else TrafficState()

    def revision(self) -> int:
        return int(self.client.get(f"{self.prefix}:rev") or 0)

    def update(self, mutate: Callable[[TrafficState], T]) -> tuple[TrafficState, T]:
        import redis

        key = f"{self.prefix}:state"
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    state = TrafficState.model_validate_json(raw) if raw else TrafficState()
                    result = mutate(state)
                    state.revision += 1
                    pipe.multi()
                    pipe.set(key, state.model_dump_json())
                    pipe.set(f"{self.prefix}:rev", state.revision)
                    pipe.execute()
                    return state, result
                except redis.WatchError:
                    continue

    def ack(self, worker: str, revision: int) -> None:
        self.client.set(f"{self.prefix}:ack:{worker}", revision, px=self.ack_ttl_ms)

    def acks(self) -> dict[str, int]:
        keys = list(self.client.scan_iter(f"{self.prefix}:ack:*", count=500))
        if not keys:
            return {}
        values = self.client.mget(keys)
        prefix = len(f"{self.prefix}:ack:")
        return {k.decode()[prefix:]: int(v) for k, v in zip(keys, values, strict=True) if v}

    def try_lead(self, who: str, ttl_s: float) -> bool:
        key = f"{self.prefix}:leader"
        if self.client.set(key, who, nx=True, px=int(ttl_s * 1000)):
            return True
        if self.client.get(key) == who.encode():
            self.client.pexpire(key, int(ttl_s * 1000))
            return True
        return False


def open_backend(redis_url: str | None, settings: TrafficSettings) -> StateBackend:
    if redis_url:
        return RedisStateBackend(redis_url, settings.redis_key, settings.ack_ttl_s)
    return FileStateBackend(settings.state_dir, settings.ack_ttl_s)


def sticky_bucket(family: str, entity: str) -> int:
    """0-9999, stable across processes and restarts for the same family and entity."""
    return zlib.crc32(f"{family}\x00{entity}".encode()) % 10_000


def pick_version(weights: dict[str, int], bucket: int) -> str:
    """The version owning `bucket` when weights (percent) are laid out in version order."""
    edge = 0
    ordered = sorted(weights)
    for version in ordered:
        edge += weights[version] * 100
        if bucket < edge:
            return version
    return ordered[-1]


def validate_weights(weights: dict[str, int]) -> str | None:
    """A message naming what is wrong, or None."""
    if not weights:
        return "weights: at least one version is required"
    negative = [v for v, w in weights.items() if w < 0]
    if negative:
        return f"weights: negative weight for {', '.join(negative)}"
    total = sum(weights.values())
    if total != 100:
        return f"weights: must sum to 100, got {total}"
    return None
