"""`tiffin.limits.LimitsMiddleware` driven with raw ASGI messages: no server, no mocks of the
middleware itself; the inner application is a real ASGI app that records what reached it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import pytest

from tiffin.limits import LimitsMiddleware, LimitsSettings, TokenBuckets


class Recorder:
    """An ASGI app that reads its body like a handler would and answers 200 with its length."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.hold = hold

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        messages = []
        more = True
        while more:
            message = await receive()
            messages.append(message)
            more = message.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in messages)
        self.calls.append({"path": scope["path"], "body": body, "messages": len(messages)})
        if self.hold is not None:
            await self.hold.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


def scope(
    path: str = "/score/fraud",
    headers: Iterable[tuple[str, str]] = (),
    method: str = "POST",
    client: str = "10.0.0.1",
) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": (client, 40000),
    }


class Wire:
    """The server side of one request: chunks to deliver (None = stall forever), sent messages."""

    def __init__(self, chunks: list[bytes | None]) -> None:
        self.chunks = list(chunks)
        self.received = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self.chunks:
            await asyncio.Event().wait()  # like a real server: only a disconnect comes later
        chunk = self.chunks.pop(0)
        if chunk is None:
            await asyncio.Event().wait()
        self.received += 1
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


def run(app: Any, sc: dict[str, Any], wire: Wire, timeout: float = 5) -> Wire:
    async def go() -> None:
        await asyncio.wait_for(app(sc, wire.receive, wire.send), timeout)

    asyncio.run(go())
    return wire


def settings(**overrides: Any) -> LimitsSettings:
    return LimitsSettings(**{"max_body_bytes": 4096, **overrides})


def test_declared_oversized_body_is_413_before_anything_is_read() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings())
    wire = run(app, scope(headers=[("content-length", "5000")]), Wire([b"x" * 5000]))
    assert wire.status == 413
    assert wire.json["error"].startswith("body: 5000 bytes is over the limit of 4096")
    assert wire.received == 0 and inner.calls == []
    assert wire.headers["connection"] == "close"


def test_chunked_oversized_body_is_413_without_reading_it_all() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings())
    chunks: list[bytes | None] = [b"x" * 1024] * 100  # 100 KiB announced by nobody
    wire = run(app, scope(), Wire(chunks))
    assert wire.status == 413 and "body: over the limit of 4096" in wire.json["error"]
    assert wire.received == 5 and inner.calls == []


def test_upload_paths_get_the_upload_limit() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings(max_upload_bytes=20_000))
    body = b"x" * 10_000
    wire = run(app, scope("/models/register", [("content-length", "10000")]), Wire([body]))
    assert wire.status == 200 and inner.calls[0]["body"] == body


def test_body_arrives_whole_in_one_message() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings())
    wire = run(app, scope(), Wire([b"ab", b"cd", b"ef"]))
    assert wire.status == 200
    assert inner.calls == [{"path": "/score/fraud", "body": b"abcdef", "messages": 1}]


def test_stalled_body_is_408_and_never_reaches_the_app() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings(body_idle_timeout_s=0.2))
    wire = run(app, scope(headers=[("content-length", "100")]), Wire([b"{", None]))
    assert wire.status == 408 and wire.json["error"].startswith("body: not received in time")
    assert wire.headers["connection"] == "close" and inner.calls == []


def test_trickled_body_hits_the_total_deadline() -> None:
    class Trickle(Wire):
        async def receive(self) -> dict[str, Any]:
            await asyncio.sleep(0.05)  # always under the idle timeout
            self.received += 1
            return {"type": "http.request", "body": b"x", "more_body": True}

    inner = Recorder()
    app = LimitsMiddleware(inner, settings(body_idle_timeout_s=1, body_total_timeout_s=0.5))
    wire = run(app, scope(), Trickle([]))
    assert wire.status == 408 and 5 <= wire.received <= 11 and inner.calls == []


def test_client_gone_mid_body_is_dropped_quietly() -> None:
    class Gone(Wire):
        async def receive(self) -> dict[str, Any]:
            return {"type": "http.disconnect"}

    inner = Recorder()
    wire = run(LimitsMiddleware(inner, settings()), scope(), Gone([]))
    assert wire.sent == [] and inner.calls == []


def test_multipart_without_boundary_is_a_400() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings())
    bad = scope("/generate", [("content-type", "multipart/form-data")])
    wire = run(app, bad, Wire([b"--x--"]))
    assert wire.status == 400 and wire.json["error"].startswith("content-type:")
    good = scope("/generate", [("content-type", "multipart/form-data; boundary=x")])
    assert run(app, good, Wire([b"--x--"])).status == 200


def test_content_length_that_is_not_a_number_is_a_400() -> None:
    app = LimitsMiddleware(Recorder(), settings())
    wire = run(app, scope(headers=[("content-length", "lots")]), Wire([b"{}"]))
    assert wire.status == 400 and wire.json["error"].startswith("content-length:")


def test_rate_limit_per_client_with_retry_after() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings(rate_limit_per_s=1, rate_limit_burst=3))
    statuses = [run(app, scope(), Wire([b"{}"])).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = run(app, scope(), Wire([b"{}"]))
    assert limited.headers["retry-after"] == "1" and "rate limit" in limited.json["error"]
    assert run(app, scope(client="10.0.0.2"), Wire([b"{}"])).status == 200
    assert run(app, scope("/readyz", method="GET"), Wire([b""])).status == 200  # probes exempt


def test_forwarded_for_is_used_only_when_trusted() -> None:
    app = LimitsMiddleware(Recorder(), settings(rate_limit_per_s=0.01, rate_limit_burst=1))
    spoofed = [("x-forwarded-for", "1.2.3.4")]
    assert run(app, scope(headers=spoofed), Wire([b""])).status == 200
    assert run(app, scope(headers=[("x-forwarded-for", "5.6.7.8")]), Wire([b""])).status == 429
    trusting = LimitsMiddleware(
        Recorder(),
        settings(rate_limit_per_s=0.01, rate_limit_burst=1, trust_forwarded_for=True),
    )
    assert run(trusting, scope(headers=spoofed), Wire([b""])).status == 200
    assert (
        run(trusting, scope(headers=[("x-forwarded-for", "5.6.7.8, 9.9.9.9")]), Wire([b""])).status
        == 200
    )
    assert run(trusting, scope(headers=spoofed), Wire([b""])).status == 429


def test_token_buckets_refill_and_stay_bounded() -> None:
    buckets = TokenBuckets(rate=2, burst=1, max_clients=3)
    assert buckets.take("a", 0.0) == 0
    assert buckets.take("a", 0.1) == pytest.approx(0.4)
    assert buckets.take("a", 0.6) == 0  # refilled at 2/s
    for i in range(10):
        buckets.take(f"client-{i}", 1.0)
    assert len(buckets) == 3


def test_overload_is_503_with_retry_after_and_probes_still_answer() -> None:
    async def go() -> tuple[list[Wire], Wire, Wire]:
        hold = asyncio.Event()
        app = LimitsMiddleware(Recorder(hold), settings(max_in_flight=2))
        busy = [Wire([b"{}"]) for _ in range(2)]
        tasks = [asyncio.create_task(app(scope(), w.receive, w.send)) for w in busy]
        await asyncio.sleep(0.05)
        shed = Wire([b"{}"])
        await app(scope(), shed.receive, shed.send)
        probe = Wire([b""])
        probe_task = asyncio.create_task(
            app(scope("/livez", method="GET"), probe.receive, probe.send)
        )
        await asyncio.sleep(0.05)
        hold.set()
        await asyncio.gather(*tasks, probe_task)
        return busy, shed, probe

    busy, shed, probe = asyncio.run(go())
    assert shed.status == 503 and shed.headers["retry-after"] == "1"
    assert "overloaded" in shed.json["error"]
    assert [w.status for w in busy] == [200, 200] and probe.status == 200


def test_in_flight_count_is_released_after_errors() -> None:
    class Boom:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("handler bug")

    app = LimitsMiddleware(Boom(), settings(max_in_flight=1))
    for _ in range(3):
        with pytest.raises(RuntimeError):
            run(app, scope(), Wire([b"{}"]))
    assert app._in_flight == 0


def test_cors_preflight_and_headers_on_errors() -> None:
    inner = Recorder()
    app = LimitsMiddleware(inner, settings(cors_origins=["https://shop.example"]))
    preflight = scope(
        "/score/fraud",
        [
            ("origin", "https://shop.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ],
        method="OPTIONS",
    )
    ok = run(app, preflight, Wire([b""]))
    assert ok.status == 200
    assert ok.headers["access-control-allow-origin"] == "https://shop.example"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert ok.headers["access-control-max-age"] == "600"
    evil = [("origin", "https://evil.example"), ("access-control-request-method", "POST")]
    refused = run(app, scope("/score/fraud", evil, method="OPTIONS"), Wire([b""]))
    assert refused.status == 400 and "access-control-allow-origin" not in refused.headers
    too_big = scope(headers=[("origin", "https://shop.example"), ("content-length", "999999")])
    answered = run(app, too_big, Wire([b""]))
    assert answered.status == 413
    assert answered.headers["access-control-allow-origin"] == "https://shop.example"
    assert inner.calls == []


def test_no_cors_headers_unless_configured() -> None:
    app = LimitsMiddleware(Recorder(), settings())
    wire = run(app, scope(headers=[("origin", "https://shop.example")]), Wire([b"{}"]))
    assert wire.status == 200 and "access-control-allow-origin" not in wire.headers


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIFFIN_LIMITS_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("TIFFIN_LIMITS_PROBE_PATHS", '["/livez"]')
    monkeypatch.setenv("TIFFIN_LIMITS_MAX_BODY_BYTES", "2048")
    s = LimitsSettings()
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.probe_paths == ["/livez"] and s.max_body_bytes == 2048
    monkeypatch.setenv("TIFFIN_LIMITS_MAX_BODY_BYTES", "10")
    with pytest.raises(ValueError, match="max_body_bytes"):
        LimitsSettings()


def test_non_http_scopes_pass_through() -> None:
    seen = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    asyncio.run(LimitsMiddleware(inner, settings())({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_outside_cancellation_is_not_mistaken_for_a_body_timeout() -> None:
    """BentoML's request timeout cancels the task from outside: that must propagate as a
    cancellation, not be answered 408 (only the watchdog's own cancellations are)."""
    app = LimitsMiddleware(Recorder(), settings(body_idle_timeout_s=5))
    wire = Wire([b"{", None])
    with pytest.raises(TimeoutError):
        run(app, scope(), wire, timeout=0.2)
    assert wire.sent == []
    assert app._body_watchdog is not None and app._body_watchdog.deadlines == {}


def test_concurrent_reads_time_out_independently() -> None:
    async def go() -> tuple[Wire, Wire]:
        app = LimitsMiddleware(Recorder(), settings(body_idle_timeout_s=0.3))
        stalled, fine = Wire([b"{", None]), Wire([b"{", b"}"])
        await asyncio.gather(
            app(scope(), stalled.receive, stalled.send), app(scope(), fine.receive, fine.send)
        )
        return stalled, fine

    stalled, fine = asyncio.run(go())
    assert stalled.status == 408 and fine.status == 200
