"""The online feature store against a real redis-server, and the embedded store beside it.

pytest-asyncio is not used: each test drives its coroutine with `asyncio.run`, and a
RedisFeatureStore is created inside the coroutine (it keeps one client per event loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import redis

from models.seed_features import seed_redis, snapshot
from tests.conftest import RedisServer, free_port
from tiffin.feature_store import (
    EmbeddedFeatureStore,
    EntityLookup,
    FeatureStore,
    RedisFeatureStore,
    open_store,
    pack,
    unpack,
)
from tiffin.featurize import CARD, ENTITIES, MERCHANT
from tiffin.settings import FeatureStoreSettings

T = TypeVar("T")
Status = dict[str, object]


def redis_store(url: str, retry_after_s: float = 2.0) -> RedisFeatureStore:
    return RedisFeatureStore(url, FeatureStoreSettings(url=url, retry_after_s=retry_after_s))


def run_with(make: Callable[[], FeatureStore], body: Callable[[FeatureStore], Awaitable[T]]) -> T:
    """Create the store inside a fresh event loop, run `body` on it, and always close it."""

    async def main() -> T:
        store = make()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def card_records(n: int, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # values that float32 represents only approximately, so a float64 round trip would show
    return (rng.normal(0, 1, (n, len(CARD.fields))) * 1000 / 3).astype(np.float32)


def assert_defaults(lookup: EntityLookup, kind: str, degraded: bool = False) -> None:
    assert lookup.found is False
    assert lookup.written_at is None
    assert lookup.degraded is degraded
    assert lookup.values.dtype == np.float32
    np.testing.assert_array_equal(lookup.values, ENTITIES[kind].default_record())


def uid(prefix: str) -> str:
    return f"{prefix}_{time.monotonic_ns()}"


def test_pack_unpack_round_trip_is_exact() -> None:
    record = card_records(1)[0]
    decoded = unpack(pack(record, 1712345678.123456), len(CARD.fields))
    assert decoded is not None
    values, written_at = decoded
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, record)
    assert written_at == 1712345678.123456
    assert unpack(pack(record, 1.0)[:-4], len(CARD.fields)) is None
    assert unpack(pack(record, 1.0) + b"\0" * 4, len(CARD.fields)) is None


@pytest.mark.parametrize("backend", ["redis", "embedded"])
def test_write_then_fetch_returns_exact_values_and_written_at(
    redis_server: RedisServer, backend: str
) -> None:
    ids = [uid("card_a"), uid("card_b"), uid("card_c")]
    records = card_records(3)
    stamps = [1_700_000_000.25, 1_700_000_123.5, time.time()]

    def make() -> FeatureStore:
        return redis_store(redis_server.url) if backend == "redis" else EmbeddedFeatureStore()

    async def body(store: FeatureStore) -> list[EntityLookup]:
        await store.write("card", ids, records, stamps)
        return await store.fetch([("card", ids[2]), ("card", ids[0]), ("card", ids[1])])

    got = run_with(make, body)

    for lookup, row in zip(got, (2, 0, 1), strict=True):
        assert lookup.kind == "card"
        assert lookup.entity_id == ids[row]
        assert lookup.found is True
        assert lookup.degraded is False
        assert lookup.values.dtype == np.float32
        np.testing.assert_array_equal(lookup.values, records[row])
        assert lookup.written_at == stamps[row]


@pytest.mark.parametrize("backend", ["redis", "embedded"])
def test_missing_entity_returns_defaults(redis_server: RedisServer, backend: str) -> None:
    known = uid("merchant_known")
    merchant = np.asarray([[0.2, 77.0]], dtype=np.float32)

    def make() -> FeatureStore:
        return redis_store(redis_server.url) if backend == "redis" else EmbeddedFeatureStore()

    async def body(store: FeatureStore) -> list[EntityLookup]:
        await store.write("merchant", [known], merchant, [123.0])
        return await store.fetch(
            [("card", uid("card_never_written")), ("merchant", known), ("user", "user_nobody")]
        )

    card, found, user = run_with(make, body)

    assert_defaults(card, "card")
    assert card.entity_id is not None and card.entity_id.startswith("card_never_written")
    assert found.found is True
    np.testing.assert_array_equal(found.values, merchant[0])
    assert_defaults(user, "user")


@pytest.mark.parametrize("backend", ["redis", "embedded"])
def test_none_entity_id_returns_defaults(redis_server: RedisServer, backend: str) -> None:
    known = uid("card_known")
    record = card_records(1)

    def make() -> FeatureStore:
        return redis_store(redis_server.url) if backend == "redis" else EmbeddedFeatureStore()

    async def body(store: FeatureStore) -> list[EntityLookup]:
        await store.write("card", [known], record, [9.0])
        return await store.fetch([("session", None), ("card", known), ("card", None)])

    session, card, no_card = run_with(make, body)

    assert_defaults(session, "session")
    assert session.entity_id is None
    assert card.found is True and card.written_at == 9.0
    np.testing.assert_array_equal(card.values, record[0])
    assert_defaults(no_card, "card")


def test_none_entity_ids_do_not_query_redis() -> None:
    """Nothing listens on this port: any query would fail and mark the lookups degraded."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    store = redis_store(url)

    async def body(s: FeatureStore) -> list[EntityLookup]:
        return await s.fetch([("card", None), ("merchant", None)])

    card, merchant = run_with(lambda: store, body)

    assert_defaults(card, "card", degraded=False)
    assert_defaults(merchant, "merchant", degraded=False)
    assert store.last_error is None
    # the same store does reach for the (absent) server as soon as an id is given
    (lookup,) = run_with(lambda: store, lambda s: s.fetch([("card", "card_1")]))
    assert_defaults(lookup, "card", degraded=True)
    assert store.last_error is not None


def test_record_of_wrong_length_falls_back_to_defaults(redis_server: RedisServer) -> None:
    short, long_, good = uid("card_short"), uid("card_long"), uid("card_good")
    record = card_records(1)[0]
    raw = redis.Redis.from_url(redis_server.url)
    try:
        raw.set(f"features:card:{short}", pack(record[:-1], 5.0))
        raw.set(f"features:card:{long_}", pack(np.append(record, 1.0), 5.0))
        raw.set(f"features:card:{good}", pack(record, 5.0))
    finally:
        raw.close()

    got = run_with(
        lambda: redis_store(redis_server.url),
        lambda s: s.fetch([("card", short), ("card", long_), ("card", good)]),
    )

    assert_defaults(got[0], "card")
    assert_defaults(got[1], "card")
    assert got[2].found is True
    np.testing.assert_array_equal(got[2].values, record)


def test_redis_going_down_degrades_to_defaults_and_status_says_down(
    fresh_redis: RedisServer,
) -> None:
    card = uid("card_x")
    record = card_records(1)

    async def body(
        store: FeatureStore,
    ) -> tuple[list[EntityLookup], Status, list[EntityLookup], float, Status]:
        await store.write("card", [card], record, [42.0])
        before = await store.fetch([("card", card)])
        status_up = await store.status()
        fresh_redis.stop()
        started = time.perf_counter()
        during = await store.fetch([("card", card), ("merchant", "merchant_00001")])
        elapsed = time.perf_counter() - started
        status_down = await store.status()
        return before, status_up, during, elapsed, status_down

    store = redis_store(fresh_redis.url)
    before, status_up, during, elapsed, status_down = run_with(lambda: store, body)

    assert before[0].found is True
    assert status_up == {"status": "ok", "backend": "redis"}
    assert_defaults(during[0], "card", degraded=True)
    assert_defaults(during[1], "merchant", degraded=True)
    assert elapsed < 1.0  # a refused connection is not waited on
    assert status_down["status"] == "down"
    assert status_down["backend"] == "redis"
    assert status_down["error"] == store.last_error
    assert "ConnectionError" in str(status_down["error"])


def test_redis_unreachable_from_the_start_degrades(fresh_redis: RedisServer) -> None:
    fresh_redis.stop()

    async def body(store: FeatureStore) -> tuple[list[EntityLookup], Status]:
        return await store.fetch([("card", "card_00000001")]), await store.status()

    (lookup,), status = run_with(lambda: redis_store(fresh_redis.url), body)

    assert_defaults(lookup, "card", degraded=True)
    assert status["status"] == "down"


def test_redis_store_breaker_holds_then_recovers(fresh_redis: RedisServer) -> None:
    card = uid("card_back")
    record = card_records(1)
    store = redis_store(fresh_redis.url, retry_after_s=3.0)

    async def body(
        s: FeatureStore,
    ) -> tuple[EntityLookup, EntityLookup, EntityLookup, Status, Status]:
        await s.write("card", [card], record, [7.0])
        fresh_redis.stop()
        (down,) = await s.fetch([("card", card)])
        fresh_redis.start()  # same port, an empty server (no persistence)
        await s.write("card", [card], record, [8.0])
        (held,) = await s.fetch([("card", card)])  # breaker still open: Redis is not asked
        held_status = await s.status()
        await asyncio.sleep(3.1)
        (back,) = await s.fetch([("card", card)])
        back_status = await s.status()
        return down, held, back, held_status, back_status

    down, held, back, held_status, back_status = run_with(lambda: store, body)

    assert_defaults(down, "card", degraded=True)
    assert_defaults(held, "card", degraded=True)
    assert held_status == {"status": "degraded", "backend": "redis"}
    assert back.found is True and back.degraded is False and back.written_at == 8.0
    np.testing.assert_array_equal(back.values, record[0])
    assert back_status == {"status": "ok", "backend": "redis"}


def test_embedded_store_status_counts_keys() -> None:
    async def body(store: FeatureStore) -> Status:
        await store.write("card", ["a", "b"], card_records(2), [1.0, 2.0])
        await store.write("card", ["a"], card_records(1, seed=9), [3.0])
        return await store.status()

    assert run_with(EmbeddedFeatureStore, body) == {
        "status": "ok",
        "backend": "embedded",
        "keys": 2,
    }


def test_open_store_picks_backend_from_settings(redis_server: RedisServer) -> None:
    assert isinstance(open_store(FeatureStoreSettings(url=None, host=None)), EmbeddedFeatureStore)
    store = open_store(FeatureStoreSettings(url=redis_server.url))
    assert isinstance(store, RedisFeatureStore) and store.url == redis_server.url
    by_host = open_store(FeatureStoreSettings(url=None, host="127.0.0.1", port=6380, db=2))
    assert isinstance(by_host, RedisFeatureStore)
    assert by_host.url == "redis://127.0.0.1:6380/2"


def test_seed_redis_writes_schema_and_entities(fresh_redis: RedisServer) -> None:
    written = asyncio.run(seed_redis(fresh_redis.url, 100))

    tables = {t.kind: t for t in snapshot(100)}
    assert written == sum(len(t.ids) for t in tables.values())
    raw = redis.Redis.from_url(fresh_redis.url)
    try:
        for kind, schema in ENTITIES.items():
            assert raw.get(f"features:schema:{kind}") == ",".join(schema.fields).encode()
        assert raw.get("features:schema:card") == ",".join(CARD.fields).encode()
        assert raw.exists("features:card:card_00000099") == 1
        assert raw.exists("features:card:card_00000100") == 0
    finally:
        raw.close()

    async def body(store: FeatureStore) -> list[EntityLookup]:
        return await store.fetch(
            [("card", "card_00000042"), ("merchant", "merchant_high_risk"), ("card", "card_x")]
        )

    card, high_risk, unknown = run_with(lambda: redis_store(fresh_redis.url), body)

    assert card.found is True and card.degraded is False
    # the snapshot is drawn from a fixed seed: the stored record is the generated one
    np.testing.assert_array_equal(card.values, tables["card"].records[42].astype(np.float32))
    assert card.written_at is not None and time.time() - 310 < card.written_at <= time.time()
    assert high_risk.found is True
    assert high_risk.values.shape == (len(MERCHANT.fields),)
    np.testing.assert_allclose(high_risk.values, [0.35, 300.0])
    assert_defaults(unknown, "card")


def test_fetch_columns_decodes_a_whole_batch_in_one_round_trip(redis_server: RedisServer) -> None:
    """Seed 001's batch path: every card and merchant of a batch in one MGET, rows aligned."""
    cards = [uid(f"card_batch{i}") for i in range(300)]
    merchant = uid("merchant_batch")
    records = card_records(300, seed=11)
    stamps = np.arange(300, dtype=np.float64) + 1_700_000_000.5
    written = list(range(0, 300, 2))  # every other card exists
    raw = redis.Redis.from_url(redis_server.url)
    try:
        raw.set(f"features:card:{cards[1]}", pack(records[1][:-1], 5.0))  # malformed record
        before = raw.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)

        async def body(store: FeatureStore) -> dict[str, Any]:
            await store.write(
                "card", [cards[i] for i in written], records[written], stamps[written]
            )
            await store.write("merchant", [merchant], np.asarray([[0.3, 9.0]], np.float32), [7.0])
            return await store.fetch_columns(
                {"card": [*cards, None], "merchant": [merchant, None, "merchant_nobody"]}
            )

        got = run_with(lambda: redis_store(redis_server.url), body)
        after = raw.info("commandstats")["cmdstat_mget"]["calls"]
    finally:
        raw.close()

    assert after - before == 1
    card, merchants = got["card"], got["merchant"]
    assert card.values.shape == (301, len(CARD.fields)) and card.values.dtype == np.float32
    assert card.found.tolist() == [i % 2 == 0 for i in range(300)] + [False]
    np.testing.assert_array_equal(card.values[written], records[written])
    np.testing.assert_array_equal(card.written_at[written], stamps[written])
    for row in (1, 3, 300):  # malformed, absent, no id: the documented defaults
        np.testing.assert_array_equal(card.values[row], CARD.default_record())
        assert np.isnan(card.written_at[row])
    assert card.defaults_used(1) == f"card:{cards[1]}" and card.defaults_used(300) is None
    assert card.defaults_used(0) is None and not card.degraded
    assert merchants.found.tolist() == [True, False, False]
    np.testing.assert_array_equal(merchants.values[1], MERCHANT.default_record())
    assert merchants.defaults_used(2) == "merchant:merchant_nobody"


def test_fetch_columns_degrades_when_redis_is_unreachable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    got = run_with(lambda: redis_store(url), lambda s: s.fetch_columns({"card": ["card_1", None]}))
    card = got["card"]
    assert card.degraded and not card.found.any()
    np.testing.assert_array_equal(card.values, np.tile(CARD.default_record(), (2, 1)))


def test_a_restarted_redis_is_not_a_degraded_request(fresh_redis: RedisServer) -> None:
    """A pooled connection that died with the old server is replaced once, transparently."""
    card = uid("card_restart")

    async def body(store: FeatureStore) -> tuple[list[EntityLookup], list[EntityLookup]]:
        await store.write("card", [card], card_records(1), [3.0])
        before = await store.fetch([("card", card)])
        fresh_redis.stop()
        fresh_redis.start()  # same port, empty: the pooled connection is now dead
        raw = redis.Redis.from_url(fresh_redis.url)
        raw.set(f"features:card:{card}", pack(card_records(1)[0], 4.0))
        raw.close()
        return before, await store.fetch([("card", card)])

    store = redis_store(fresh_redis.url)
    before, after = run_with(lambda: store, body)
    assert before[0].found and before[0].written_at == 3.0
    assert after[0].found and not after[0].degraded and after[0].written_at == 4.0
    assert store.last_error is None
