"""The online feature store: entity records keyed `<prefix>:<kind>:<id>`.

A record is packed as little-endian `float64 written_at` followed by the entity's fields as
`float32` in schema order (see `tiffin.featurize.ENTITIES`): one `MGET` fetches every entity a
request or a whole batch needs in a single round trip, and decoding is a `numpy.frombuffer`.
The field order of each kind is also published at `<prefix>:schema:<kind>` for operators.

Two backends share one interface: Redis (production) and an embedded in-process dict (laptops and
`make serve` without `REDIS_URL`). Redis trouble never fails a request: lookups fall back to the
documented defaults and say so (`found=False`, `degraded=True`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tiffin.featurize import ENTITIES
from tiffin.settings import FeatureStoreSettings

log = logging.getLogger("tiffin.features")
_HEADER = struct.Struct("<d")
Timestamps = Sequence[float] | np.ndarray


def pack(record: np.ndarray, written_at: float) -> bytes:
    return _HEADER.pack(written_at) + np.asarray(record, dtype="<f4").tobytes()


def unpack(blob: bytes, n_fields: int) -> tuple[np.ndarray, float] | None:
    """None when the blob does not match the schema (e.g. written by an older schema)."""
    if len(blob) != _HEADER.size + 4 * n_fields:
        return None
    (written_at,) = _HEADER.unpack_from(blob)
    return np.frombuffer(blob, dtype="<f4", offset=_HEADER.size), written_at


@dataclass(frozen=True)
class EntityLookup:
    """One entity's record, or its defaults when it was not found."""

    kind: str
    entity_id: str | None
    values: np.ndarray
    found: bool
    written_at: float | None
    degraded: bool = False

    def age_seconds(self, now: float) -> float | None:
        return None if self.written_at is None else max(0.0, now - self.written_at)


class FeatureStore(Protocol):
    backend: str

    async def fetch(self, wanted: Sequence[tuple[str, str | None]]) -> list[EntityLookup]: ...

    async def write(
        self, kind: str, ids: Sequence[str], records: np.ndarray, written_at: Timestamps
    ) -> None: ...

    async def status(self) -> dict[str, object]: ...

    async def close(self) -> None: ...


def _defaults(kind: str, entity_id: str | None, degraded: bool = False) -> EntityLookup:
    return EntityLookup(kind, entity_id, ENTITIES[kind].default_record(), False, None, degraded)


def _decode(kind: str, entity_id: str | None, blob: bytes | None) -> EntityLookup:
    if blob is None:
        return _defaults(kind, entity_id)
    decoded = unpack(blob, len(ENTITIES[kind].fields))
    if decoded is None:
        log.warning(
            "feature record %s:%s does not match its schema; using defaults", kind, entity_id
        )
        return _defaults(kind, entity_id)
    values, written_at = decoded
    return EntityLookup(kind, entity_id, values, True, written_at)


class EmbeddedFeatureStore:
    """In-process store with the same interface; every worker holds its own copy."""

    backend = "embedded"

    def __init__(self, prefix: str = "features") -> None:
        self.prefix = prefix
        self._data: dict[str, bytes] = {}

    async def fetch(self, wanted: Sequence[tuple[str, str | None]]) -> list[EntityLookup]:
        get = self._data.get
        return [
            _decode(kind, eid, get(f"{self.prefix}:{kind}:{eid}") if eid is not None else None)
            for kind, eid in wanted
        ]

    async def write(
        self, kind: str, ids: Sequence[str], records: np.ndarray, written_at: Timestamps
    ) -> None:
        self.write_sync(kind, ids, records, written_at)

    def write_sync(
        self, kind: str, ids: Sequence[str], records: np.ndarray, written_at: Timestamps
    ) -> None:
        for eid, rec, ts in zip(ids, records, written_at, strict=True):
            self._data[f"{self.prefix}:{kind}:{eid}"] = pack(rec, ts)

    async def status(self) -> dict[str, object]:
        return {"status": "ok", "backend": self.backend, "keys": len(self._data)}

    async def close(self) -> None:
        return None


class RedisFeatureStore:
    """Redis with hiredis parsing; a failure opens a short breaker instead of failing requests."""

    backend = "redis"

    def __init__(self, url: str, settings: FeatureStoreSettings) -> None:
        self.url = url
        self.settings = settings
        self.prefix = settings.key_prefix
        self._client: object | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_until = 0.0
        self.last_error: str | None = None

    def _redis(self):
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # one client per event loop
            timeout = self.settings.timeout_ms / 1000
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                max_connections=64,
                health_check_interval=30,
            )
            self._loop = loop
        return self._client

    async def fetch(self, wanted: Sequence[tuple[str, str | None]]) -> list[EntityLookup]:
        keys = [f"{self.prefix}:{kind}:{eid}" for kind, eid in wanted if eid is not None]
        if not keys:
            return [_defaults(kind, eid) for kind, eid in wanted]
        if time.monotonic() < self._down_until:
            return [_defaults(kind, eid, degraded=True) for kind, eid in wanted]
        try:
            blobs = iter(await self._redis().mget(keys))
        except Exception as exc:  # any Redis/network failure degrades, never fails the request
            self._trip(exc)
            return [_defaults(kind, eid, degraded=True) for kind, eid in wanted]
        return [
            _decode(kind, eid, next(blobs) if eid is not None else None) for kind, eid in wanted
        ]

    def _trip(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._down_until = time.monotonic() + self.settings.retry_after_s
        log.warning("feature store unavailable, scoring on defaults: %s", self.last_error)

    async def write(
        self, kind: str, ids: Sequence[str], records: np.ndarray, written_at: Timestamps
    ) -> None:
        client = self._redis()
        async with client.pipeline(transaction=False) as pipe:
            for eid, rec, ts in zip(ids, records, written_at, strict=True):
                pipe.set(f"{self.prefix}:{kind}:{eid}", pack(rec, ts))
            pipe.set(f"{self.prefix}:schema:{kind}", ",".join(ENTITIES[kind].fields))
            await pipe.execute()

    async def status(self) -> dict[str, object]:
        try:
            await self._redis().ping()
        except Exception as exc:
            self._trip(exc)
            return {"status": "down", "backend": self.backend, "error": self.last_error}
        degraded = time.monotonic() < self._down_until
        return {"status": "degraded" if degraded else "ok", "backend": self.backend}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()  # type: ignore[attr-defined]
            self._client = None


def open_store(settings: FeatureStoreSettings) -> FeatureStore:
    url = settings.resolved_url()
    if url:
        return RedisFeatureStore(url, settings)
    return EmbeddedFeatureStore(settings.key_prefix)


def chunks(items: Sequence[str], size: int) -> Iterable[slice]:
    for start in range(0, len(items), size):
        yield slice(start, start + size)
