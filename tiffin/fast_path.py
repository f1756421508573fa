"""The hot scoring routes, answered below BentoML's per-request machinery.

BentoML's endpoint wrapper, router and IO descriptors cost ~0.95 ms of CPU per request on this
box, several times the model work (docs/benchmarks.md). This ASGI middleware answers the seeds'
scoring routes directly: the same request schemas validate the body, the same `Scoring` does the
work, errors keep the same `{"error": "<field>: <problem>"}` shape and status codes. The routes
stay declared as BentoML APIs, so `/docs`, the OpenAPI schema and `bentoml.SyncHTTPClient` are
unchanged; any other request passes through untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from tiffin import schemas
from tiffin.errors import TiffinError
from tiffin.http_errors import describe_errors
from tiffin.scoring import Scoring
from tiffin.settings import server_settings

log = logging.getLogger("tiffin.fast_path")
Handler = Callable[[Scoring, Any], Awaitable[Any]]


@dataclass
class FastRoute:
    schema: type[BaseModel]
    handle: Handler
    batch: bool = False
    """Admitted through the worker's batch slots (`ServerSettings.batch_concurrency`)."""


class V1PredictBody(BaseModel):
    instances: schemas.Instances
    version: str | None = None


class ScoreBatchBody(BaseModel):
    model_type: schemas.BatchModelType
    requests: schemas.BatchItems
    batch_id: str | None = None


ROUTES: dict[str, FastRoute] = {
    "/score/fraud": FastRoute(schemas.CardFraudRequest, lambda s, r: s.card_fraud(r)),
    "/score/personalization": FastRoute(
        schemas.PersonalizationRequest, lambda s, r: s.personalization(r)
    ),
    "/score/batch": FastRoute(
        ScoreBatchBody, lambda s, r: s.batch(r.model_type, r.requests, r.batch_id), batch=True
    ),
    "/predict/fraud": FastRoute(schemas.AdFraudRequest, lambda s, r: s.ad_fraud(r)),
    "/predict/ctr": FastRoute(schemas.CtrRequest, lambda s, r: s.ctr(r)),
    "/predict/bid": FastRoute(schemas.BidRequest, lambda s, r: s.bid(r)),
    "/predict": FastRoute(schemas.GenericPredictRequest, lambda s, r: s.generic_predict(r)),
    "/v1/models/predict": FastRoute(
        V1PredictBody, lambda s, r: s.v1_predict(r.instances, r.version)
    ),
}


class Bound:
    """The worker's `Scoring`, bound by the entry service once it is constructed."""

    scoring: Scoring | None = None


bound = Bound()


def _describe(exc: ValidationError) -> dict[str, Any]:
    detail = exc.errors(include_context=False, include_input=False, include_url=False)
    return {"error": describe_errors(detail), "detail": detail}


async def _answer(route: FastRoute, scoring: Scoring, body: bytes) -> tuple[int, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return 400, {"error": f"body: Invalid JSON: {exc}"}
    if not isinstance(data, dict):
        return 400, {"error": "body: Input should be an object"}
    try:
        request = route.schema.model_validate(data)
        result = await route.handle(scoring, request)
    except ValidationError as exc:
        return 400, _describe(exc)
    except TiffinError as exc:
        status = int(exc.error_code)
        if status >= 500:
            log.warning("request failed: %s", exc)
        return status, {"error": str(exc)}
    if isinstance(result, BaseModel):
        return 200, result.model_dump(mode="json")
    if isinstance(result, list):
        return 200, [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in result]
    return 200, result


class FastPathMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._batch_slots: asyncio.Semaphore | None = None  # created on the worker's own loop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        route = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        scoring = bound.scoring
        if route is None or scoring is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if not route.batch:
            await self._serve(route, scoring, scope, receive, send)
            return
        if self._batch_slots is None:
            self._batch_slots = asyncio.Semaphore(server_settings().batch_concurrency)
        async with self._batch_slots:  # waiting batches stay raw bytes, not 256 parsed rows
            await self._serve(route, scoring, scope, receive, send)

    async def _serve(
        self, route: FastRoute, scoring: Scoring, scope: Any, receive: Any, send: Any
    ) -> None:
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        try:
            status, payload = await _answer(route, scoring, b"".join(chunks))
        except Exception:  # never a stack trace to the client
            log.exception("unexpected error on %s", scope["path"])
            status, payload = (
                500,
                {"error": "An unexpected error has occurred, please check the server log."},
            )
        body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
