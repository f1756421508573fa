"""The Tiffin ASGI application: every Tiffin route of one worker, over one `Worker`.

- Scoring routes (`SCORING`) are matched by exact path and answered here directly: decode the
  body with the route's schema, run the pipeline, encode once. BentoML's per-request machinery
  costs several times the model work on these (docs/benchmarks.md), so it is not in their path.
- Everything else (ops, admin, LLM, OpenAI-compatible, API documents) is a Starlette route.
- When the LLM runs elsewhere, its routes are forwarded to it as they are.
- Anything that is not a Tiffin route goes to `fallback`: BentoML's own app (`/livez`,
  `/readyz`, `/docs`) under `bentoml serve`, a 404 in `local_app()`.

Every error becomes a response through the one table in `tiffin.http_errors`.

`TiffinGateway` hosts the application under `bentoml serve`: it sits outermost among the
service's ASGI middlewares and, once BentoML has built the service instance (whose `__init__`
runs the composition root), takes that instance's `worker`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route, Router

from tiffin import admin, drift_routes, monitoring, ops, schemas
from tiffin.composition import Worker
from tiffin.context import WORKER
from tiffin.http_errors import body_endpoint, decode, problem_of, send_json, tiffin_body
from tiffin.llm import endpoints as llm_endpoints
from tiffin.llm import openai_api
from tiffin.llm import routes as llm_routes
from tiffin.llm.forward import is_llm_path
from tiffin.oip import RouterBackend, oip_routes
from tiffin.openapi import ApiDoc, bentoml_schema, openapi_document
from tiffin.pipelines import Reply, Scoring, V1Request

log = logging.getLogger("tiffin.app")
ASGI = Callable[[Any, Any, Any], Awaitable[None]]


class V1PredictBody(BaseModel):
    instances: schemas.Instances
    version: str | None = None


class ScoreBatchBody(BaseModel):
    model_type: schemas.BatchModelType
    requests: schemas.BatchItems
    batch_id: str | None = None


class PredictBatchBody(BaseModel):
    requests: schemas.GenericRequests
    batch_size: schemas.BatchSize = 10


@dataclass(frozen=True)
class ScoringRoute:
    doc: ApiDoc
    handle: Callable[[Scoring, Any], Awaitable[Any]]
    batch: bool = False
    """Admitted through the worker's batch slots (`ServerSettings.batch_concurrency`)."""


def _route(
    name: str,
    path: str,
    request: type[BaseModel],
    response: Any,
    handle: Callable[[Scoring, Any], Awaitable[Any]],
    batch: bool = False,
) -> ScoringRoute:
    return ScoringRoute(ApiDoc(name, path, request, response), handle, batch)


SCORING: dict[str, ScoringRoute] = {
    r.doc.path: r
    for r in (
        _route(
            "predict_fraud",
            "/predict/fraud",
            schemas.AdFraudRequest,
            schemas.AdFraudResponse,
            lambda s, r: s.ad_fraud(r),
        ),
        _route(
            "predict_ctr",
            "/predict/ctr",
            schemas.CtrRequest,
            schemas.CtrResponse,
            lambda s, r: s.ctr(r),
        ),
        _route(
            "predict_bid",
            "/predict/bid",
            schemas.BidRequest,
            schemas.BidResponse,
            lambda s, r: s.bid(r),
        ),
        _route(
            "score_fraud",
            "/score/fraud",
            schemas.CardFraudRequest,
            schemas.CardFraudResponse,
            lambda s, r: s.score_fraud(r),
        ),
        _route(
            "score_personalization",
            "/score/personalization",
            schemas.PersonalizationRequest,
            schemas.PersonalizationResponse,
            lambda s, r: s.score_personalization(r),
        ),
        _route(
            "score_batch",
            "/score/batch",
            ScoreBatchBody,
            schemas.BatchResponse,
            lambda s, r: s.batch(r.model_type, r.requests, r.batch_id),
            batch=True,
        ),
        _route(
            "predict",
            "/predict",
            schemas.GenericPredictRequest,
            schemas.GenericPredictResponse,
            lambda s, r: s.generic(r),
        ),
        _route(
            "predict_batch",
            "/predict/batch",
            PredictBatchBody,
            list[schemas.GenericPredictResponse],
            lambda s, r: s.predict_batch(r.requests),
            batch=True,
        ),
        _route(
            "v1_predict",
            "/v1/models/predict",
            V1PredictBody,
            dict[str, Any],
            lambda s, r: s.v1(V1Request(r.instances, r.version)),
        ),
    )
}
LLM_DOCS = [
    ApiDoc(
        "generate",
        "/generate",
        llm_endpoints.GenerateRequest,
        llm_endpoints.GenerateResponse,
    ),
    ApiDoc(
        "generate_structured",
        "/generate/structured",
        llm_endpoints.StructuredRequest,
        llm_endpoints.StructuredResponse,
    ),
]


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)


def _json_bytes(payload: Any) -> bytes:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    elif isinstance(payload, list):
        payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in payload]
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


async def _read_body(receive: Any) -> bytes:
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


class _ServedAt:
    """An ASGI app answering at another path: seed 004's API docs at `/docs` are BentoML's
    Swagger UI page, which BentoML serves at `/` (its assets' links are relative to `/`)."""

    def __init__(self, app: ASGI, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        moved = {**scope, "path": self.path, "raw_path": self.path.encode()}
        await self.app(moved, receive, send)


class TiffinApp:
    def __init__(self, worker: Worker, fallback: ASGI | None = None) -> None:
        self.worker = worker
        self.scoring = SCORING if worker.scoring is not None else {}
        routes = self._routes(worker)
        if fallback is not None:
            routes.append(Route("/docs", _ServedAt(fallback, "/"), methods=["GET"]))
        self.router = Router(routes, default=fallback or _not_found)
        self._batch_slots: asyncio.Semaphore | None = None  # created on the worker's own loop

    def _routes(self, worker: Worker) -> list[BaseRoute]:
        tabular = worker.families is not None
        docs: list[ApiDoc] = [r.doc for r in self.scoring.values()]
        routes: list[BaseRoute] = list(ops.routes if tabular else ops.llm_only_routes)
        if tabular:
            assert worker.families is not None and worker.scoring is not None
            inference = RouterBackend(worker.families, worker.scoring.rows)
            routes += admin.routes
            routes += monitoring.routes
            routes += drift_routes.routes
            routes += oip_routes(lambda _: inference, max_rows=worker.server.max_batch_rows)
            # GET on a scoring path is a 405, as on every other POST-only route
            routes += [Route(path, _not_found, methods=["POST"]) for path in self.scoring]
        if worker.llm is not None:
            docs += LLM_DOCS
            routes += [
                Route(
                    "/generate",
                    body_endpoint(llm_endpoints.GenerateRequest, llm_endpoints.generate),
                    methods=["POST"],
                ),
                Route(
                    "/generate/structured",
                    body_endpoint(
                        llm_endpoints.StructuredRequest, llm_endpoints.generate_structured
                    ),
                    methods=["POST"],
                ),
                *llm_routes.routes,
                Mount("/openai", routes=openai_api.routes),
            ]
        document = openapi_document(docs, routes)
        schema = bentoml_schema(docs)

        async def openapi(_: Any) -> Any:
            return JSONResponse(document)

        async def bentoml_client_schema(_: Any) -> Any:
            return JSONResponse(schema)

        return [
            *routes,
            Route("/docs.json", openapi, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/schema.json", bentoml_client_schema, methods=["GET"]),
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[WORKER] = self.worker
            route = self.scoring.get(scope["path"]) if scope["method"] == "POST" else None
            if route is not None:
                await self._score(route, receive, send)
                return
            forwarded = self.worker.forwarded_llm
            if forwarded is not None and is_llm_path(scope["path"]):
                await forwarded.forward(scope, receive, send)
                return
        try:
            await self.router(scope, receive, send)
        except HTTPException as exc:  # Starlette raises a wrong method when hosted in an app
            response = PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
            await response(scope, receive, send)

    async def _score(self, route: ScoringRoute, receive: Any, send: Any) -> None:
        body = await _read_body(receive)  # before any slot: a slow upload holds nothing
        try:
            if route.batch:
                if self._batch_slots is None:
                    self._batch_slots = asyncio.Semaphore(self.worker.server.batch_concurrency)
                async with self._batch_slots:  # waiting batches stay raw bytes, not parsed rows
                    result = await route.handle(self._scoring(), decode(route.doc.request, body))
            else:
                result = await route.handle(self._scoring(), decode(route.doc.request, body))
            headers: Iterable[tuple[str, str]] = ()
            if isinstance(result, Reply):
                headers, result = result.headers.items(), result.body
            status, payload = 200, _json_bytes(result)
        except Exception as exc:
            problem = problem_of(exc)
            status, payload = problem.status, orjson.dumps(tiffin_body(problem))
            headers = tuple(problem.headers.items())
        await send_json(
            send, status, payload, ((k.lower().encode(), v.encode()) for k, v in headers)
        )

    def _scoring(self) -> Scoring:
        assert self.worker.scoring is not None
        return self.worker.scoring


class TiffinGateway:
    """Hosts `TiffinApp` inside `bentoml serve`; added with `Service.add_asgi_middleware`.

    BentoML builds the service instance during its own lifespan start-up; once that start-up
    completes, the instance's `worker` exists and the application is built around it. Until
    then (and for every path that is not Tiffin's) requests go to BentoML's app.
    """

    def __init__(self, app: ASGI) -> None:
        self.bentoml_app = app
        self.app: TiffinApp | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.bentoml_app(scope, receive, self._on_started(send))
            return
        if self.app is None:
            await self.bentoml_app(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _on_started(self, send: Any) -> Any:
        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                import bentoml

                worker = bentoml.get_current_service().worker
                self.app = TiffinApp(worker, fallback=self.bentoml_app)
            elif message["type"] == "lifespan.shutdown.complete" and self.app is not None:
                self.app.worker.close()
            await send(message)

        return wrapped


def local_app() -> TiffinApp:
    """The whole bundle in this process, no server: runners built here, settings from the
    environment, the BentoML model store as configured. What `tiffin.client`'s local mode and
    in-process tests call."""
    from service import build_worker

    return TiffinApp(build_worker(local=True))
