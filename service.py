"""Tiffin's entry service: composes the runners and routes the seeds' endpoints.

Handlers are one line each: the request body is validated by its schema (`tiffin.schemas`), the
work happens in `tiffin.scoring`, and errors carry their own status (`tiffin.errors`).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import bentoml

from runners.ad_fraud import AdFraudRunner
from runners.bid import BidRunner
from runners.card_fraud import CardFraudRunner
from runners.ctr import CtrRunner
from runners.generic import GenericRunner
from runners.llm import packaged_llm_model
from runners.personalization import PersonalizationRunner
from tiffin import admin, ops, schemas
from tiffin.auth import auth_settings, check_startup
from tiffin.fast_path import FastPathMiddleware, bound
from tiffin.feature_store import EmbeddedFeatureStore, open_store
from tiffin.http_errors import ClientErrorMiddleware
from tiffin.lifecycle.manager import LifecycleManager
from tiffin.lifecycle.traffic import TrafficSettings, open_backend
from tiffin.limits import LimitsMiddleware
from tiffin.llm import openai_api
from tiffin.llm import routes as llm_routes
from tiffin.llm.endpoints import LLMEndpoints
from tiffin.llm.runtime import install_llm
from tiffin.llm.settings import llm_settings
from tiffin.log_filters import install_client_error_log_filter, install_repeated_traceback_filter
from tiffin.model_pool import ModelPool
from tiffin.scoring import Scoring
from tiffin.settings import feature_store_settings, model_settings, server_settings
from tiffin.topology import cache_output_media_types, serve_runners_in_process

SERVER = server_settings()
logging.getLogger("tiffin").setLevel(SERVER.log_level)
check_startup(auth_settings(), SERVER.environment)
ops.app.router.routes.extend([*admin.routes, *llm_routes.routes])


def _fill_embedded(store: EmbeddedFeatureStore) -> None:
    from models.seed_features import snapshot

    for table in snapshot(feature_store_settings().embedded_entities):
        store.write_sync(table.kind, table.ids, table.records, table.written_at)


@bentoml.asgi_app(openai_api.app, path="/openai")  # OpenAI-compatible base URL: /openai/v1
@bentoml.asgi_app(ops.app, path="/")
@bentoml.service(
    name="tiffin",
    workers=SERVER.workers,
    # the LLM's own deadline governs generation; tabular requests answer in milliseconds
    traffic={"timeout": max(30, llm_settings().request_timeout_s + 10), "max_concurrency": 512},
    http={"port": SERVER.port},
    logging={"access": {"enabled": SERVER.access_log}},
    metrics={"enabled": SERVER.http_metrics},
    tracing={} if SERVER.tracing else {"excluded_urls": ["."]},
)
class Tiffin(LLMEndpoints):
    card_fraud = bentoml.depends(CardFraudRunner)
    personalization = bentoml.depends(PersonalizationRunner)
    ad_fraud = bentoml.depends(AdFraudRunner)
    ctr = bentoml.depends(CtrRunner)
    bid = bentoml.depends(BidRunner)
    generic = bentoml.depends(GenericRunner)

    def __init__(self) -> None:
        store = open_store(feature_store_settings())
        if isinstance(store, EmbeddedFeatureStore):
            _fill_embedded(store)
        family_pools = {
            runner.pool.family: runner.pool
            for runner in (self.card_fraud, self.personalization, self.ad_fraud, self.ctr, self.bid)
        }

        def pool_of(family: str) -> ModelPool:
            return family_pools.get(family) or self.generic.pool(family)

        traffic = TrafficSettings()
        backend = open_backend(feature_store_settings().resolved_url(), traffic)
        lifecycle = LifecycleManager(pool_of, backend, traffic).start()
        v1_model = model_settings().v1_model
        self.scoring = Scoring(pool_of, store, v1_model, lifecycle)
        bound.scoring = self.scoring
        admin.context.lifecycle, admin.context.v1_model = lifecycle, v1_model
        self.llm = install_llm()
        ops.state.probes["llm"] = llm_routes.health_component
        ops.state.store = store
        ops.state.lifecycle = lifecycle
        ops.state.loaded_versions = lambda: {
            **{name: pool.describe() for name, pool in family_pools.items()},
            **self.generic.versions(),
        }
        # A full collection walks every object alive, ~0.1M after start-up (BentoML, schemas,
        # models): 50-80 ms with the event loop stopped, the tail of a batch ramp. Objects that
        # live as long as the worker are moved out of the collector's sight.
        gc.collect()
        gc.freeze()

    # --- seed 000 -----------------------------------------------------------------------------

    @bentoml.api(route="/predict/fraud", input_spec=schemas.AdFraudRequest)
    async def predict_fraud(self, **fields: Any) -> schemas.AdFraudResponse:
        return await self.scoring.ad_fraud(schemas.AdFraudRequest.model_construct(**fields))

    @bentoml.api(route="/predict/ctr", input_spec=schemas.CtrRequest)
    async def predict_ctr(self, **fields: Any) -> schemas.CtrResponse:
        return await self.scoring.ctr(schemas.CtrRequest.model_construct(**fields))

    @bentoml.api(route="/predict/bid", input_spec=schemas.BidRequest)
    async def predict_bid(self, **fields: Any) -> schemas.BidResponse:
        return await self.scoring.bid(schemas.BidRequest.model_construct(**fields))

    # --- seed 001 -----------------------------------------------------------------------------

    @bentoml.api(route="/score/fraud", input_spec=schemas.CardFraudRequest)
    async def score_fraud(self, **fields: Any) -> schemas.CardFraudResponse:
        request = schemas.CardFraudRequest.model_construct(**fields)
        return schemas.CardFraudResponse.model_validate(await self.scoring.card_fraud(request))

    @bentoml.api(route="/score/personalization", input_spec=schemas.PersonalizationRequest)
    async def score_personalization(self, **fields: Any) -> schemas.PersonalizationResponse:
        request = schemas.PersonalizationRequest.model_construct(**fields)
        response = await self.scoring.personalization(request)
        return schemas.PersonalizationResponse.model_validate(response)

    @bentoml.api(route="/score/batch")
    async def score_batch(
        self,
        model_type: schemas.BatchModelType,
        requests: schemas.BatchItems,
        batch_id: str | None = None,
    ) -> schemas.BatchResponse:
        response = await self.scoring.batch(model_type, requests, batch_id)
        return schemas.BatchResponse.model_validate(response)

    # --- seed 003 -----------------------------------------------------------------------------

    @bentoml.api(route="/predict", input_spec=schemas.GenericPredictRequest)
    async def predict(self, **fields: Any) -> schemas.GenericPredictResponse:
        request = schemas.GenericPredictRequest.model_construct(**fields)
        return await self.scoring.generic_predict(request)

    @bentoml.api(route="/predict/batch")
    async def predict_batch(
        self,
        requests: schemas.GenericRequests,
        batch_size: schemas.BatchSize = 10,
    ) -> list[schemas.GenericPredictResponse]:
        return [await self.scoring.generic_predict(r) for r in requests]

    # --- seed 004 -----------------------------------------------------------------------------

    @bentoml.api(route="/v1/models/predict")
    async def v1_predict(
        self,
        instances: schemas.Instances,
        version: str | None = None,
    ) -> dict[str, Any]:
        return await self.scoring.v1_predict(instances, version)


# BentoML nests middlewares in the order added, the first outermost: edge limits (body size and
# read time, load shedding, rate limit, CORS) before anything reads a body; then the hot scoring
# routes are answered before ClientErrorMiddleware wraps `send` for the rest (~4% of a worker's
# samples).
install_client_error_log_filter()  # BentoML logs 4xx at ERROR with a traceback (tiffin.log_filters)
install_repeated_traceback_filter()  # the lifecycle poller's traceback per tick while Redis is down
Tiffin.add_asgi_middleware(LimitsMiddleware)  # type: ignore[attr-defined]
Tiffin.add_asgi_middleware(FastPathMiddleware)  # type: ignore[attr-defined]
Tiffin.add_asgi_middleware(ClientErrorMiddleware)  # type: ignore[attr-defined]
serve_runners_in_process(Tiffin)
if (_llm_model := packaged_llm_model()) is not None:  # None until models.tiny_llm has run
    Tiffin.models.append(_llm_model)  # type: ignore[attr-defined]
cache_output_media_types(Tiffin)
