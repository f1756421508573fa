"""The LLM runner in another process or on another machine, seen from the entry service.

Its HTTP routes (`/generate`, `/generate/structured`, `/openai/...`, `/circuit-breaker/...`,
`/llm/status`) are forwarded as they are, streams included, so clients get the runner's own
bodies and status codes. `/score/fraud`'s `llm_explanation` asks the runner's
`/generate/structured` and falls back to the rule-based explanation like the in-process path.
A runner that is down or slow is a 503 naming it, within the LLM's deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import httpx
import orjson

from tiffin.llm.explain import SYSTEM, rule_based_explanation
from tiffin.llm.response_models import FraudExplanation
from tiffin.llm.settings import LLMSettings

log = logging.getLogger("tiffin.llm.forward")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length"}


def is_llm_path(path: str) -> bool:
    return path in ("/generate", "/generate/structured", "/llm/status") or path.startswith(
        ("/openai/", "/circuit-breaker/")
    )


class ForwardedLLM:
    def __init__(self, client: httpx.AsyncClient, settings: LLMSettings, name: str = "llm"):
        self.client = client
        self.settings = settings
        self.name = name

    async def forward(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _HOP_BY_HOP]
        query = scope.get("query_string", b"").decode()
        url = scope["path"] + (f"?{query}" if query else "")
        request = self.client.build_request(
            scope["method"],
            url,
            headers=headers,
            content=body,
            timeout=self.settings.request_timeout_s,
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self._unavailable(send, exc)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.lower() not in _HOP_BY_HOP - {b"content-length"}
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _unavailable(self, send: Any, exc: Exception) -> None:
        body = orjson.dumps(
            {
                "error": f"runner {self.name!r} is unavailable: {exc or type(exc).__name__}",
                "component": "llm",
                "runner": self.name,
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def explain(
        self, context: Mapping[str, Any]
    ) -> tuple[FraudExplanation, Literal["llm", "rules"]]:
        facts = "\n".join(f"{k}: {v}" for k, v in context.items())
        try:
            response = await self.client.post(
                "/generate/structured",
                json={
                    "prompt": f"Transaction and model output:\n{facts}"[:4000],
                    "system": SYSTEM,
                    "response_model": "fraud_explanation",
                    "max_tokens": self.settings.explain_max_tokens,
                    "temperature": 0.3,
                },
                timeout=self.settings.explain_timeout_ms / 1000,
            )
            if response.status_code == 200:
                return FraudExplanation.model_validate(response.json()["data"]), "llm"
            log.info("LLM runner explanation unavailable (%s); rule-based kept", response.text)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.info("LLM runner explanation unavailable (%s); rule-based kept", exc)
        return rule_based_explanation(context), "rules"

    async def health(self) -> dict[str, Any]:
        try:
            response = await self.client.get("/llm/status", timeout=2.0)
            status = response.json()
            status["runner"] = self.name
            return status
        except (httpx.HTTPError, ValueError) as exc:
            return {"status": "down", "runner": self.name, "reason": str(exc) or type(exc).__name__}
