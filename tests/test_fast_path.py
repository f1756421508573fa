"""The fast path's admission of batches, driven in process with real models and real scoring."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tiffin import fast_path
from tiffin.feature_store import EmbeddedFeatureStore
from tiffin.model_pool import ModelPool
from tiffin.scoring import Scoring
from tiffin.settings import server_settings


class CountingScoring(Scoring):
    """Real scoring, instrumented to count the batches inside it at once."""

    active = 0
    peak = 0

    async def batch(self, *args: Any) -> dict[str, Any]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.01)  # about a feature-store round trip of waiting
            return await super().batch(*args)
        finally:
            self.active -= 1


def test_a_worker_scores_at_most_batch_concurrency_batches_at_once(model_store: str) -> None:
    pool = ModelPool.for_declared("card_fraud:latest")
    scoring = CountingScoring(lambda _: pool, EmbeddedFeatureStore(), "species_classifier")
    middleware = fast_path.FastPathMiddleware(app=None)
    body = orjson.dumps(
        {"model_type": "card_fraud", "requests": [{"card_id": "c1", "transaction_amount": 5}] * 8}
    )

    async def one_request() -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/score/batch", "method": "POST"}
        await middleware(scope, receive, send)
        assert orjson.loads(sent[1]["body"])["count"] == 8
        return int(sent[0]["status"])

    async def twenty_at_once() -> list[int]:
        return list(await asyncio.gather(*(one_request() for _ in range(20))))

    previous, fast_path.bound.scoring = fast_path.bound.scoring, scoring
    try:
        statuses = asyncio.run(twenty_at_once())
    finally:
        fast_path.bound.scoring = previous
    assert statuses == [200] * 20
    assert scoring.peak == server_settings().batch_concurrency == 8
