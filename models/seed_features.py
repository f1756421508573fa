"""Seed the online feature store from generated event history.

`python -m models.seed_features` writes cards, merchants, users, items and sessions to Redis
(`REDIS_URL` / `REDIS_HOST`), each stamped with when its aggregates were computed, so responses
report real freshness. The embedded store is filled from the same snapshot at start-up.

IDs follow the seeds' examples: `card_00001234`, `merchant_12345`, `user_00005678`,
`item_electronics_001`, `session_000042`, plus `merchant_high_risk`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

import numpy as np

from models import datagen
from tiffin.feature_store import RedisFeatureStore, chunks
from tiffin.featurize import MERCHANT
from tiffin.settings import FeatureStoreSettings

SNAPSHOT_SEED = 424242


@dataclass
class EntityTable:
    kind: str
    ids: list[str]
    records: np.ndarray
    written_at: np.ndarray


def snapshot(n_entities: int = 10_000, now: float | None = None) -> list[EntityTable]:
    """The entity tables, computed as a stream processor would have, up to 5 minutes ago."""
    rng = np.random.default_rng(SNAPSHOT_SEED)
    now = time.time() if now is None else now

    def stamps(n: int) -> np.ndarray:
        return now - rng.uniform(1, 300, n)

    cards = datagen.card_population(rng, n_entities).records
    merchants = datagen.merchant_population(rng, 20_000)
    high_risk = np.asarray([[0.35, 300.0]], dtype=np.float32)
    users = datagen.user_population(rng, n_entities)
    item_ids, items = datagen.item_population(rng, 40)
    sessions = datagen.session_population(rng, n_entities)
    assert merchants.shape[1] == len(MERCHANT.fields)
    return [
        EntityTable(
            "card", [f"card_{i:08d}" for i in range(n_entities)], cards, stamps(n_entities)
        ),
        EntityTable(
            "merchant",
            [*(f"merchant_{i:05d}" for i in range(len(merchants))), "merchant_high_risk"],
            np.vstack([merchants, high_risk]),
            stamps(len(merchants) + 1),
        ),
        EntityTable(
            "user", [f"user_{i:08d}" for i in range(n_entities)], users, stamps(n_entities)
        ),
        EntityTable("item", item_ids, items, stamps(len(item_ids))),
        EntityTable(
            "session", [f"session_{i:06d}" for i in range(n_entities)], sessions, stamps(n_entities)
        ),
    ]


async def seed_redis(url: str, n_entities: int) -> int:
    store = RedisFeatureStore(url, FeatureStoreSettings(url=url, timeout_ms=5000))
    written = 0
    try:
        for table in snapshot(n_entities):
            for part in chunks(table.ids, 2000):
                await store.write(
                    table.kind, table.ids[part], table.records[part], table.written_at[part]
                )
            written += len(table.ids)
            print(f"  {table.kind}: {len(table.ids)} records", flush=True)
    finally:
        await store.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Seed the Redis feature store")
    parser.add_argument("--redis-url", default=None, help="defaults to REDIS_URL / REDIS_HOST")
    parser.add_argument("--entities", type=int, default=None, help="cards/users/sessions to write")
    args = parser.parse_args(argv)
    settings = FeatureStoreSettings()
    url = args.redis_url or settings.resolved_url()
    if not url:
        print("no Redis configured (REDIS_URL or --redis-url); the embedded store seeds itself")
        return 0
    started = time.perf_counter()
    count = asyncio.run(seed_redis(url, args.entities or settings.embedded_entities))
    print(
        f"seeded {count} entities into {url.split('@')[-1]} in {time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
