"""JSON logs without personal data, the X-Request-ID middleware over a real Starlette app, and
OpenTelemetry spans (real SDK, in-memory exporter) that cost nothing when tracing is off."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tiffin.logs import LogSettings, RequestIdMiddleware, bind, configure_logging, get_logger
from tiffin.tracing import FEATURE_FETCH, MODEL_CALL, Spans


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = configure_logging(
        "INFO", LogSettings(pii_hash_key=SecretStr("k" * 32), requests=True), stream=stream
    )
    yield stream
    logging.getLogger("tiffin").removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_hash_ids_and_drop_ips(output: io.StringIO) -> None:
    log = get_logger("tiffin.scoring")
    for _ in range(2):
        log.info(
            "scored",
            card_id="card_00001234",
            ip_address="192.168.1.1",
            user_agent="Mozilla/5.0",
            model="card_fraud",
            version="v1.0",
            latency_ms=1.25,
            items=[{"user_id": "user_1"}],
        )
    first, second = lines(output)
    assert first["event"] == "scored" and first["level"] == "info"
    assert first["logger"] == "tiffin.scoring" and first["timestamp"].endswith("Z")
    assert (first["model"], first["version"], first["latency_ms"]) == ("card_fraud", "v1.0", 1.25)
    assert first["ip_address"] == first["user_agent"] == "[dropped]"
    assert len(first["card_id"]) == 16 and first["card_id"] == second["card_id"]
    assert "card_00001234" not in output.getvalue() and "user_1" not in output.getvalue()
    assert "192.168" not in output.getvalue()


def test_ids_are_dropped_without_a_hash_key_and_ips_masked_in_text() -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", LogSettings(), stream=stream)
    try:
        get_logger("tiffin.x").info("from 10.1.2.3 at 14:45:00 via fe80::1", user_id="user_9")
        logging.getLogger("tiffin.models").warning("client %s failed", "2001:db8::7")
    finally:
        logging.getLogger("tiffin").removeHandler(handler)
    structured, stdlib = lines(stream)
    assert structured["user_id"] == "[dropped]"
    assert structured["event"] == "from [ip] at 14:45:00 via [ip]"  # a time is not an address
    assert stdlib["event"] == "client [ip] failed" and stdlib["logger"] == "tiffin.models"
    assert stdlib["level"] == "warning"


def _app() -> Any:
    async def score(request: Request) -> JSONResponse:
        bind(model="card_fraud", version="v1.0")
        get_logger("tiffin.scoring").info("scored", card_id="card_1")
        return JSONResponse({"ok": True}, headers={"X-Request-ID": "from-the-app"})

    return RequestIdMiddleware(
        Starlette(routes=[Route("/score", score, methods=["POST"])]), LogSettings(requests=True)
    )


def _call(headers: dict[str, Any]) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/score", headers=headers)

    return asyncio.run(run())


def test_request_id_is_accepted_bound_and_returned(output: io.StringIO) -> None:
    response = _call({"X-Request-ID": "abc-123"})
    assert response.headers.get_list("x-request-id") == ["abc-123"]
    scored, request = lines(output)
    assert scored["request_id"] == request["request_id"] == "abc-123"
    assert request["event"] == "request" and request["status"] == 200
    assert request["model"] == "card_fraud" and request["version"] == "v1.0"
    assert request["path"] == "/score" and request["latency_ms"] >= 0


@pytest.mark.parametrize("sent", [None, "bad id with spaces", "x" * 200, "a\u00e9".encode()])
def test_a_missing_or_malformed_request_id_is_replaced(output: io.StringIO, sent: Any) -> None:
    response = _call({"X-Request-ID": sent} if sent else {})
    returned = response.headers["x-request-id"]
    assert returned != sent and len(returned) == 32 and int(returned, 16) >= 0
    assert all(line["request_id"] == returned for line in lines(output))


def test_context_does_not_leak_between_requests(output: io.StringIO) -> None:
    _call({"X-Request-ID": "first"})
    get_logger("tiffin.after").info("outside a request")
    assert "request_id" not in lines(output)[-1]


def test_spans_for_feature_fetch_and_model_call() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = Spans(True, provider)
    with spans.span("request"), spans.span(FEATURE_FETCH, model="card_fraud", backend="redis"):
        pass
    with spans.span(MODEL_CALL, model="card_fraud", version="v1.0", rows=3):
        pass
    finished = {s.name: s for s in exporter.get_finished_spans()}
    assert set(finished) == {"request", FEATURE_FETCH, MODEL_CALL}
    parent, attributes = finished[FEATURE_FETCH].parent, finished[MODEL_CALL].attributes
    assert parent is not None and attributes is not None
    assert parent.span_id == finished["request"].context.span_id
    assert dict(attributes) == {
        "model": "card_fraud",
        "version": "v1.0",
        "rows": 3,
    }


def test_spans_are_free_when_tracing_is_off() -> None:
    off = Spans(False)
    first, second = off.span(FEATURE_FETCH), off.span(MODEL_CALL, rows=1)
    assert first is second  # one shared no-op, nothing allocated per request
    with first as inside:
        assert inside is None
