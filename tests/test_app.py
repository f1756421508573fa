"""The Tiffin application in process, with real models and real scoring: batch admission, the
error table, and the API documents."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from tiffin.app import TiffinApp, local_app
from tiffin.pipelines import Scoring


@pytest.fixture(scope="module")
def app(model_store: str) -> TiffinApp:
    return local_app()


class Counting:
    """Wraps the worker's real `Scoring.batch` to count the batches inside it at once."""

    def __init__(self, scoring: Scoring) -> None:
        self.real = scoring.batch
        self.active = 0
        self.peak = 0

    async def __call__(self, *args: Any) -> dict[str, Any]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.01)  # about a feature-store round trip of waiting
            return await self.real(*args)
        finally:
            self.active -= 1


def test_a_worker_scores_at_most_batch_concurrency_batches_at_once(app: TiffinApp) -> None:
    scoring = app.worker.scoring
    assert scoring is not None
    counting = Counting(scoring)
    body = orjson.dumps(
        {"model_type": "card_fraud", "requests": [{"card_id": "c1", "transaction_amount": 5}] * 8}
    )

    async def twenty_at_once() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiffin") as client:
            return list(
                await asyncio.gather(
                    *(client.post("/score/batch", content=body) for _ in range(20))
                )
            )

    scoring.batch = counting  # type: ignore[method-assign]
    try:
        responses = asyncio.run(twenty_at_once())
    finally:
        scoring.batch = counting.real  # type: ignore[method-assign]
    assert [r.status_code for r in responses] == [200] * 20
    assert all(r.json()["count"] == 8 for r in responses)
    assert counting.peak == app.worker.server.batch_concurrency == 8


def test_a_batch_whose_body_never_finishes_holds_no_slot(app: TiffinApp) -> None:
    """Slots are taken after the body is read: stalled uploads cannot starve other batches."""
    stalled = asyncio.Event()

    async def never_finishes() -> dict[str, Any]:
        await stalled.wait()
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> int:
        scope = {"type": "http", "method": "POST", "path": "/score/batch", "headers": []}
        hung = [
            asyncio.create_task(app(dict(scope), never_finishes, _ignore))
            for _ in range(app.worker.server.batch_concurrency + 2)
        ]
        await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiffin") as client:
            body = {
                "model_type": "card_fraud",
                "requests": [{"card_id": "c", "transaction_amount": 3}],
            }
            answer = await asyncio.wait_for(client.post("/score/batch", json=body), 10)
        for task in hung:
            task.cancel()
        return answer.status_code

    assert asyncio.run(main()) == 200


async def _ignore(message: dict[str, Any]) -> None:
    return None


def test_the_openapi_document_is_valid_3_1(app: TiffinApp) -> None:
    from openapi_spec_validator import validate

    async def fetch() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiffin") as client:
            return (await client.get("/docs.json")).json()

    document = asyncio.run(fetch())
    validate(document)  # raises on an invalid document
    assert document["openapi"].startswith("3.1")
    schema = document["paths"]["/score/fraud"]["post"]["requestBody"]["content"]
    amount = schema["application/json"]["schema"]["properties"]["transaction_amount"]
    assert amount["exclusiveMinimum"] == 0
    assert (
        "/v1/traffic-split" in document["paths"]
        and "/openai/v1/chat/completions" in document["paths"]
    )
