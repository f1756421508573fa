"""The LLM runner as a BentoML service of its own: mlx-lm in-process (or a remote
OpenAI-compatible backend), with seed 002's endpoints and the OpenAI-compatible API.

`bentoml serve runners.llm:LLMRunner` serves, on one port:

- `POST /generate`, `POST /generate/structured` (from `LLMEndpoints`)
- `/openai/v1/...` — OpenAI-compatible chat/completions, completions, models
- `GET /circuit-breaker/status`, `POST /circuit-breaker/reset`, `GET /llm/status`
- `GET /health`, `GET /ready`

The entry service `Tiffin` embeds the same pieces (see docs/llm.md); this service is for running
the LLM on its own, e.g. on a machine with Apple Silicon next to CPU-only tabular workers.
"""

from __future__ import annotations

from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models import tiny_llm
from tiffin.http_errors import ClientErrorMiddleware
from tiffin.llm import openai_api, routes, runtime
from tiffin.llm.endpoints import LLMEndpoints
from tiffin.llm.runtime import LLM, install_llm
from tiffin.llm.settings import llm_settings

SETTINGS = llm_settings()


def packaged_llm_model() -> Any:
    """The tiny model as a BentoModel, for `bentoml build`, when it is what the LLM serves and
    it is in the store (None otherwise: a service must still start without it)."""
    from bentoml.models import BentoModel

    default = SETTINGS.model_name in (tiny_llm.NAME, f"{tiny_llm.NAME}:{tiny_llm.VERSION}")
    uses_store = SETTINGS.resolved_engine() == "mlx" and not SETTINGS.model_path
    if default and uses_store and tiny_llm.exists():
        return BentoModel(f"{tiny_llm.NAME}:{tiny_llm.VERSION}")
    return None


async def health(_: Request) -> Response:
    component = await runtime.current().health()
    ok = component["status"] in ("ok", "disabled")
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "components": {"llm": component}},
    )


async def ready(_: Request) -> Response:
    llm = runtime.current()
    if llm.engine is None and not llm.disabled:
        return JSONResponse({"status": "not_ready", "reason": llm.unavailable_reason}, 503)
    return JSONResponse({"status": "ready", "model": llm.model_id, "engine": llm.engine_kind})


ops = Starlette(
    routes=[Route("/health", health), Route("/ready", ready), *routes.routes],
)


@bentoml.asgi_app(openai_api.app, path="/openai")
@bentoml.asgi_app(ops, path="/")
@bentoml.service(
    name="tiffin_llm",
    workers=1,
    traffic={"timeout": SETTINGS.request_timeout_s + 10, "max_concurrency": 256},
)
class LLMRunner(LLMEndpoints):
    def __init__(self) -> None:
        self.llm: LLM = install_llm(SETTINGS)


_model = packaged_llm_model()
if _model is not None:
    LLMRunner.models.append(_model)  # type: ignore[attr-defined]
LLMRunner.add_asgi_middleware(ClientErrorMiddleware)  # type: ignore[attr-defined]
