"""Plain-ASGI routes of the LLM (BentoML API methods are POST-only and hide 5xx messages).

Mounted by the Tiffin application (`tiffin.app`) on every worker that has an LLM:

- `GET  /circuit-breaker/status` — seed 002: the LLM backend breaker (state, consecutive
  failures, last error, seconds until the next trial call)
- `POST /circuit-breaker/reset` — seed 002: close the breaker now (needs the API key when
  TIFFIN_LLM_API_KEY is set)
- `GET  /llm/status` — engine, model, queue, breaker and the named response models
"""

from __future__ import annotations

import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tiffin.context import llm_of
from tiffin.llm import runtime


async def breaker_status(request: Request) -> Response:
    return JSONResponse(llm_of(request).breaker_status())


async def breaker_reset(request: Request) -> Response:
    llm = llm_of(request)
    key = llm.settings.api_key
    if key is not None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token, key.get_secret_value()):
            return JSONResponse({"error": "missing or wrong API key"}, status_code=401)
    return JSONResponse(llm.reset_breaker())


async def llm_status(request: Request) -> Response:
    llm = llm_of(request)
    body: dict[str, Any] = {
        **(await llm.health()),
        "response_models": list(runtime.schema_names()),
        "openai_base_path": "/openai/v1",
    }
    return JSONResponse(body)


routes = [
    Route("/circuit-breaker/status", breaker_status, methods=["GET"]),
    Route("/circuit-breaker/reset", breaker_reset, methods=["POST"]),
    Route("/llm/status", llm_status, methods=["GET"]),
]
