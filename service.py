"""Tiffin's entry service. It only composes; nothing here handles a request.

- The runners: one BentoML service per model family and one for the LLM (`runners/`), each
  placed by `TIFFIN_TOPOLOGY` / `TIFFIN_RUNNER_URLS` (`tiffin.topology`): inside each entry
  worker (in-process, the default), in processes of their own (separate, called through
  `bentoml.depends` with adaptive batching), or at a URL (remote).
- `__init__` runs the composition root (`tiffin.composition.compose`) once per worker: model
  families, feature store, lifecycle and router, scoring pipelines, LLM.
- `TiffinGateway` serves every Tiffin route from that worker (`tiffin.app`): scoring, admin,
  ops, LLM and OpenAI-compatible. BentoML keeps `/livez`, `/readyz` (which asks
  `__is_ready__`) and the Swagger UI at `/docs`.

See docs/architecture.md for the request path and where state lives.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import bentoml

from runners.ad_fraud import AdFraudRunner
from runners.bid import BidRunner
from runners.card_fraud import CardFraudRunner
from runners.ctr import CtrRunner
from runners.generic import GenericRunner
from runners.llm import LLMRunner
from runners.personalization import PersonalizationRunner
from tiffin import header_timeout
from tiffin.app import TiffinGateway
from tiffin.auth import auth_settings, check_startup
from tiffin.composition import Worker, compose
from tiffin.lifecycle.traffic import TrafficSettings
from tiffin.limits import LimitsMiddleware, LimitsSettings
from tiffin.llm.settings import llm_settings
from tiffin.log_filters import install_client_error_log_filter, install_repeated_traceback_filter
from tiffin.logs import RequestIdMiddleware
from tiffin.ops import not_ready
from tiffin.replica import MetricsSettings, use_own_metrics_dir
from tiffin.settings import feature_store_settings, model_settings, server_settings
from tiffin.topology import RUNNER_NAMES, TopologySettings, package_models, runner

# before BentoML prepares (and empties) the Prometheus directory: one per `bentoml serve`
use_own_metrics_dir(MetricsSettings())
SERVER = server_settings()
TOPOLOGY = TopologySettings()
LLM = llm_settings()
RUNNERS: Mapping[str, Any] = {
    "card_fraud": CardFraudRunner,
    "personalization": PersonalizationRunner,
    "fraud_detection": AdFraudRunner,
    "ctr_prediction": CtrRunner,
    "bid_optimization": BidRunner,
    "generic": GenericRunner,
    "llm": LLMRunner,
}
check_startup(auth_settings(), SERVER.environment)


def build_worker(runners: Mapping[str, Any] | None = None, local: bool = False) -> Worker:
    """One worker's composition. `local`: build every runner in this process (no server)."""
    if runners is None or local:
        runners = {name: service() for name, service in RUNNERS.items()}
    return compose(
        runners,
        server=SERVER,
        models=model_settings(),
        feature_store=feature_store_settings(),
        traffic=TrafficSettings(),
        topology=TOPOLOGY,
        llm_settings=LLM,
        auth=auth_settings(),
    )


@bentoml.service(
    name="tiffin",
    workers=SERVER.workers,
    # the LLM's own deadline governs generation; tabular requests answer in milliseconds
    traffic={"timeout": max(30, LLM.request_timeout_s + 10), "max_concurrency": 512},
    http={"port": SERVER.port},
    logging={"access": {"enabled": SERVER.access_log}},
    metrics={"enabled": SERVER.http_metrics},
    tracing={} if SERVER.tracing else {"excluded_urls": ["."]},
)
class Tiffin:
    card_fraud = runner("card_fraud", CardFraudRunner, TOPOLOGY)
    personalization = runner("personalization", PersonalizationRunner, TOPOLOGY)
    fraud_detection = runner("fraud_detection", AdFraudRunner, TOPOLOGY)
    ctr_prediction = runner("ctr_prediction", CtrRunner, TOPOLOGY)
    bid_optimization = runner("bid_optimization", BidRunner, TOPOLOGY)
    generic = runner("generic", GenericRunner, TOPOLOGY)
    llm = runner("llm", LLMRunner, TOPOLOGY, enabled=LLM.enabled)

    def __init__(self) -> None:
        self.worker = build_worker({name: getattr(self, name) for name in RUNNER_NAMES})
        # A full collection walks every object alive, ~0.1M after start-up (BentoML, schemas,
        # models): 50-80 ms with the event loop stopped, the tail of a batch ramp. Objects that
        # live as long as the worker are moved out of the collector's sight.
        gc.collect()
        gc.freeze()

    async def __is_ready__(self) -> bool:
        return await not_ready(self.worker) is None


# BentoML's worker imports this module before it builds uvicorn's server: the protocol that
# bounds how long a request's headers may take is in place by then (no middleware sees headers
# before they are complete)
header_timeout.install(LimitsSettings())
install_client_error_log_filter()  # a client's mistake is one INFO line, not an ERROR trace
install_repeated_traceback_filter()
# BentoML nests middlewares in the order added, the first outermost: every response, BentoML's
# own included, carries the request id; bodies are bounded in size and time before anything
# parses them; then Tiffin's application.
Tiffin.add_asgi_middleware(RequestIdMiddleware)  # type: ignore[attr-defined]
Tiffin.add_asgi_middleware(LimitsMiddleware)  # type: ignore[attr-defined]
Tiffin.add_asgi_middleware(TiffinGateway)  # type: ignore[attr-defined]
package_models(Tiffin)
