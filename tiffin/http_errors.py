"""Client errors that name the problem, in one shape: `{"error": "<field>: <what is wrong>"}`.

BentoML 1.4.39 reports pydantic failures as "1 validation error for Input" with the field only in
`detail`, and wraps its other 4xx bodies in a one-element list (docs/upstream.md). This ASGI
middleware rewrites 4xx JSON bodies from API routes; 2xx responses pass through untouched.
"""

from __future__ import annotations

from typing import Any

import orjson


def describe_errors(detail: list[Any]) -> str:
    """Pydantic error dicts as one message naming each field: `amount: Input should be ...`."""
    parts = []
    for err in detail[:5]:
        field = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def rewrite_client_error(body: bytes) -> bytes:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict):
        payload = payload[0]
    if isinstance(payload, dict) and isinstance(payload.get("detail"), list):
        payload["error"] = describe_errors(payload["detail"])
    return orjson.dumps(payload)


class ClientErrorMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def intercept(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                held["start"] = message
                held["body"] = b""
                return
            if "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                body = rewrite_client_error(held["body"])
                start = held.pop("start")
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, intercept)
