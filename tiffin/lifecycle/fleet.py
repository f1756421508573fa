"""Per-version statistics summed over every replica that shares the traffic backend.

A replica (one `bentoml serve`, all its workers) records requests into its own Prometheus
multiprocess directory, untouched on the request path. One worker per replica publishes that
directory's cumulative per-version snapshot to Redis every `publish_interval_s`; a reader adds
every replica's published snapshot, reading its own replica's fresh from disk instead of its
published copy. So canary analysis, A/B tests and `/v1/metrics/{version}` give the same answer on
every replica: what clients were served, up to one publish interval late for other replicas.

Keys, under `<traffic prefix>:stats:`
- `live`: hash, replica id -> JSON snapshots it published (its counts minus `gone:<replica>`);
- `alive:<replica>`: set on every publish, expires after `replica_timeout_s`;
- `publisher:<replica>`: short lease naming the worker of the replica that publishes;
- `retired`: JSON sum of what replicas that stopped publishing had published;
- `gone:<replica>`: the part of a replica's counts already moved into `retired`;
- `sync` (counter and pub/sub channel), `synced`: a reader about to keep a record (a canary or
  A/B baseline, a final A/B result) asks every replica to publish now and waits until each has
  published at least its request's number, so the record misses nothing other replicas served.

Totals never go down. A replica that stops publishing (crash, restart under a new id, network
partition) is moved from `live` into `retired` in one transaction by whichever replica notices
first. If it was only paused and publishes again, it publishes its counts minus `gone:<replica>`,
so nothing is counted twice. Lost are only a crashed replica's last, unpublished, interval.
Without Redis (file backend: one host) each replica judges on its own counts (`LocalStats`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

from tiffin.errors import TiffinError
from tiffin.lifecycle import stats as vm
from tiffin.lifecycle.traffic import RedisStateBackend, StateBackend
from tiffin.replica import MetricsSettings, replica_id

log = logging.getLogger("tiffin.lifecycle")
# A paused replica that comes back within this long is not counted twice; keys of replicas that
# are gone for good disappear after it.
GONE_TTL_S = 7 * 24 * 3600
Counts = Callable[[], vm.Snapshots]


class StatsUnavailable(TiffinError):
    """Redis, which holds the other replicas' counts, cannot be reached."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class VersionStats(Protocol):
    def snapshot(
        self, model: str, versions: list[str] | None = None, fresh: bool = False
    ) -> dict[str, vm.Snapshot]:
        """Cumulative counts per version of `model` (see `tiffin.lifecycle.stats`). `fresh`: up
        to now on every replica, for a record kept (a baseline, a final result), not a look."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class LocalStats:
    """This replica's own counts: one host without Redis."""

    counts: Counts = field(default_factory=vm.local_counts)

    def snapshot(
        self, model: str, versions: list[str] | None = None, fresh: bool = False
    ) -> dict[str, vm.Snapshot]:
        return _only(self.counts().get(model, {}), versions)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class FleetStats:
    """Every replica's counts, summed through Redis."""

    client: Any  # redis.Redis
    prefix: str
    replica: str
    settings: MetricsSettings
    counts: Counts = field(default_factory=vm.local_counts)
    worker: str = field(default_factory=lambda: str(os.getpid()))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _failing: bool = False

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- reading ------------------------------------------------------------------------------

    def snapshot(
        self, model: str, versions: list[str] | None = None, fresh: bool = False
    ) -> dict[str, vm.Snapshot]:
        import redis

        try:
            if fresh:
                self.sync()
            local = _only(self.counts().get(model, {}), versions)
            with self.client.pipeline() as pipe:  # one transaction: a consistent cut
                pipe.hgetall(self._key("live"))
                pipe.get(self._key("retired"))
                pipe.get(self._key("gone", self.replica))
                live, retired, gone = pipe.execute()
        except redis.RedisError as exc:
            # no answer rather than one replica's slice presented as everyone's
            raise StatsUnavailable(f"other replicas' statistics are unavailable: {exc}") from exc
        parts = [_loads(retired)]
        parts += [_loads(raw) for name, raw in live.items() if name.decode() != self.replica]
        total: dict[str, vm.Snapshot] = {}
        for part in parts:
            for version, snap in part.get(model, {}).items():
                if versions is None or version in versions:
                    total[version] = vm.combine(total.get(version) or vm.empty(), snap)
        mine = vm.combine_all({model: local}, _loads(gone), -1.0).get(model, {})
        for version, snap in mine.items():
            if versions is None or version in versions:
                total[version] = vm.combine(total.get(version) or vm.empty(), snap)
        return total

    def sync(self) -> bool:
        """Have every other live replica publish what it has served until now: True once all have,
        False when one did not within the timeout (its previous publish counts then)."""
        seq = int(self.client.incr(self._key("sync")))
        self.client.publish(self._key("sync"), seq)
        deadline = time.monotonic() + 2 * self.settings.publish_interval_s + 1.0
        while pending := self._behind(seq):
            if time.monotonic() >= deadline:
                log.warning("replicas %s did not publish in time; using their last counts", pending)
                return False
            time.sleep(0.005)
        return True

    def _behind(self, seq: int) -> list[str]:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key("synced"))
            pipe.hkeys(self._key("live"))
            synced, live = pipe.execute()
        waiting = [n.decode() for n in live if int(synced.get(n, 0)) < seq]
        waiting = [n for n in waiting if n != self.replica]  # our own counts are read fresh
        if not waiting:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for name in waiting:
                pipe.exists(self._key("alive", name))
            alive = pipe.execute()
        return [name for name, up in zip(waiting, alive, strict=True) if up]

    # --- publishing ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tiffin-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:
                if self._lead():  # the last interval too, when shutting down cleanly
                    self.publish()
            except Exception:  # shutting down regardless: retirement keeps the earlier counts
                log.warning("final statistics publish failed", exc_info=True)

    def _run(self) -> None:
        channel: Any = None
        due = time.monotonic() + self.settings.publish_interval_s
        while not self._stop.is_set():
            try:
                if channel is None:
                    channel = self.client.pubsub(ignore_subscribe_messages=True)
                    channel.subscribe(self._key("sync"))
                asked = self._wait(channel, due)
                if self._stop.is_set():
                    break
                if self._lead():
                    self.publish()
                    if not asked:
                        self.retire_silent()
                due = time.monotonic() + self.settings.publish_interval_s
                if self._failing:
                    log.info("publishing statistics to Redis again")
                    self._failing = False
            except Exception:  # Redis blips must not end the loop; say so once, not every tick
                if not self._failing:
                    log.exception("publishing statistics to Redis failed; retrying")
                    self._failing = True
                if channel is not None:
                    channel.close()
                    channel = None
                self._stop.wait(self.settings.publish_interval_s)
        if channel is not None:
            channel.close()

    def _wait(self, channel: Any, due: float) -> bool:
        """Until `due`, or until a replica asks for a sync (then True)."""
        asked = False
        while not asked and not self._stop.is_set() and (left := due - time.monotonic()) > 0:
            asked = channel.get_message(timeout=min(left, 0.5)) is not None  # stop() waits
        while channel.get_message(timeout=0) is not None:  # one publish answers them all
            asked = True
        return asked

    def _lead(self) -> bool:
        """Whether this worker publishes for its replica (one worker does; another takes over
        within three intervals when it exits)."""
        key = self._key("publisher", self.replica)
        ttl_ms = int(self.settings.publish_interval_s * 3000)
        if self.client.set(key, self.worker, nx=True, px=ttl_ms):
            return True
        if self.client.get(key) == self.worker.encode():
            self.client.pexpire(key, ttl_ms)
            return True
        return False

    def publish(self) -> None:
        """Publish this replica's counts (minus whatever of them was already retired)."""
        import redis

        # the sync request this publish answers, read before the counts so they include everything
        # served before the request
        seq = int(self.client.get(self._key("sync")) or 0)
        local = self.counts()
        gone_key = self._key("gone", self.replica)
        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(gone_key)  # a retirement between reading and writing: redo
                    gone = _loads(pipe.get(gone_key))
                    pipe.multi()
                    pipe.hset(
                        self._key("live"), self.replica, _dumps(vm.combine_all(local, gone, -1.0))
                    )
                    pipe.set(
                        self._key("alive", self.replica),
                        1,
                        px=int(self.settings.replica_timeout_s * 1000),
                    )
                    pipe.hset(self._key("synced"), self.replica, seq)
                    if gone:
                        pipe.expire(gone_key, GONE_TTL_S)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def retire_silent(self) -> list[str]:
        """Move every replica that stopped publishing from `live` into `retired`."""
        names = [n.decode() for n in self.client.hkeys(self._key("live"))]
        names = [n for n in names if n != self.replica]
        if not names:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self._key("alive", name))
            alive = pipe.execute()
        silent = [name for name, up in zip(names, alive, strict=True) if not up]
        return [name for name in silent if self._retire(name)]

    def _retire(self, name: str) -> bool:
        import redis

        live, alive = self._key("live"), self._key("alive", name)
        retired, gone = self._key("retired"), self._key("gone", name)
        while True:
            with self.client.pipeline() as pipe:
                try:
                    # the replica publishing meanwhile, or another replica retiring it: redo
                    pipe.watch(live, alive, retired, gone)
                    raw = pipe.hget(live, name)
                    if raw is None or pipe.exists(alive):
                        return False
                    entry = _loads(raw)
                    total, before = _loads(pipe.get(retired)), _loads(pipe.get(gone))
                    pipe.multi()
                    pipe.set(retired, _dumps(vm.combine_all(total, entry)))
                    pipe.set(gone, _dumps(vm.combine_all(before, entry)), ex=GONE_TTL_S)
                    pipe.hdel(live, name)
                    pipe.hdel(self._key("synced"), name)
                    pipe.execute()
                    log.info("replica %s stopped publishing; its counts are retired", name)
                    return True
                except redis.WatchError:
                    continue


def open_stats(
    backend: StateBackend, settings: MetricsSettings | None = None, replica: str | None = None
) -> VersionStats:
    """Fleet-wide statistics when the traffic state is shared through Redis, else local ones."""
    if isinstance(backend, RedisStateBackend):
        return FleetStats(
            backend.client,
            f"{backend.prefix}:stats",
            replica or replica_id(),
            settings or MetricsSettings(),
        )
    return LocalStats()


def _only(snaps: dict[str, vm.Snapshot], versions: list[str] | None) -> dict[str, vm.Snapshot]:
    return snaps if versions is None else {v: s for v, s in snaps.items() if v in versions}


def _dumps(snaps: vm.Snapshots) -> str:
    return json.dumps(snaps, separators=(",", ":"))


def _loads(raw: bytes | str | None) -> vm.Snapshots:
    return json.loads(raw) if raw else {}
