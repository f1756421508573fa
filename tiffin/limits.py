"""Request limits at the edge of the ASGI stack: body size, body read time, load shedding,
per-client rate limiting and CORS, in one pure-ASGI middleware that runs before anything parses
the request.

Why one layer reads the whole body first: every handler behind it (BentoML's IO descriptors,
the scoring fast path, the admin and OpenAI routes) reads the body itself, with no size limit and
no deadline, and the batch route takes one of the worker's batch slots *before* reading it. This
middleware receives the body here, bounded in bytes (413 as soon as `Content-Length` or the bytes
received so far exceed the limit) and in time (408 when the client stalls), then replays it to
the application in one message. A slow or oversized upload therefore never reaches a handler, a
parser or a batch slot, and everything it held is released when it is answered.

Order inside the middleware (outermost first): CORS (so 4xx/5xx answers below carry the CORS
headers a browser needs to read them), the per-client token bucket (429 + `Retry-After`), the
body guard, load shedding (503 + `Retry-After` past `max_in_flight` requests whose body has
arrived).
Operational probes (`probe_paths`) skip shedding and rate limiting so they stay quick under
overload.

State (token buckets, the in-flight count) lives in the middleware instance, one per worker
process: limits are per worker. The in-flight count of non-probe requests is also written to
`inference_active_requests` (summed over the workers on `/metrics`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import orjson
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tiffin.http_errors import send_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MiB = 1024 * 1024
CSV = Annotated[list[str], NoDecode]


class LimitsSettings(BaseSettings):
    """Edge limits for every HTTP request (`TIFFIN_LIMITS_*`). List fields take a comma-separated
    string or a JSON array."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_LIMITS_", extra="ignore")

    max_body_bytes: int = Field(1 * MiB, ge=1024)
    """Largest request body on every route except `upload_paths`; more is a 413 before any of it
    is parsed. 1 MiB holds a full `/score/batch` (1024 rows of ~150 bytes) several times over."""

    max_upload_bytes: int = Field(64 * MiB, ge=1024)
    """Largest request body on `upload_paths` (model artifacts travel base64-encoded in JSON)."""

    upload_paths: CSV = ["/models/register"]
    """Routes that accept `max_upload_bytes` instead of `max_body_bytes`."""

    header_timeout_s: float = Field(10.0, ge=0)
    """Longest time from a connection's opening (or a request's first byte) to the end of the
    request's headers; a client slower than that is answered 408 (or, if it sent nothing, just
    disconnected). Enforced inside uvicorn's HTTP protocol (`tiffin.header_timeout`), since no
    middleware sees a request before its headers. 0 turns it off."""

    body_idle_timeout_s: float = Field(5.0, gt=0)
    """Longest pause between two chunks of a request body; a client that stalls longer gets a
    408 and its connection is closed."""

    body_total_timeout_s: float = Field(30.0, gt=0)
    """Longest time to receive a whole request body, however it trickles in (a client sending
    one byte every few seconds never trips the idle timeout)."""

    max_in_flight: int = Field(128, ge=1)
    """Requests (body received) one worker handles at once, probes excluded; more are answered
    503 with `Retry-After` at once instead of queueing on the event loop. Keep it below
    BentoML's own per-worker limit (`traffic.max_concurrency` / workers, 256 with the
    defaults), whose 429 carries no `Retry-After`."""

    overload_retry_after_s: int = Field(1, ge=1)
    """`Retry-After` of a 503 from load shedding."""

    rate_limit_per_s: float = Field(0.0, ge=0)
    """Sustained requests per second one client may send to one worker (token bucket refill);
    0 turns rate limiting off. Off by default because behind a load balancer every client shares
    the balancer's address unless `trust_forwarded_for` is set."""

    rate_limit_burst: int = Field(20, ge=1)
    """Requests a client may send at once before the sustained rate applies (bucket size)."""

    rate_limit_max_clients: int = Field(10_000, ge=1)
    """Clients whose buckets one worker remembers; the least recently seen is forgotten first,
    so a flood of distinct addresses cannot grow memory without bound."""

    trust_forwarded_for: bool = False
    """Identify clients by the first address in `X-Forwarded-For` (only behind a proxy that sets
    it; otherwise a client could choose its own identity)."""

    probe_paths: CSV = ["/livez", "/readyz", "/health", "/ready", "/metrics", "/healthz"]
    """Routes exempt from load shedding and rate limiting (orchestrator probes, scraping)."""

    cors_origins: CSV = []
    """Origins allowed to call the API from a browser (`*` for any); empty: no CORS headers and
    preflights are not answered (seed 001's CORS configuration)."""

    cors_methods: CSV = ["GET", "POST", "OPTIONS"]
    """Methods a cross-origin request may use."""

    cors_headers: CSV = ["Authorization", "Content-Type"]
    """Request headers a cross-origin request may send."""

    cors_allow_credentials: bool = False
    """Whether browsers may send cookies / HTTP auth cross-origin (never with origin `*`)."""

    cors_max_age_s: int = Field(600, ge=0)
    """How long browsers may cache a preflight answer."""

    @field_validator(
        "upload_paths", "probe_paths", "cors_origins", "cors_methods", "cors_headers", mode="before"
    )
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


class TokenBuckets:
    """One token bucket per client key, bounded in number (least recently seen evicted)."""

    def __init__(self, rate: float, burst: int, max_clients: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0 when the request may go ahead; otherwise seconds until a token is available."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


async def _answer(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_json(send, status, orjson.dumps({"error": message}), headers or [])


# The body was not read to its end: the connection cannot carry another request.
CLOSE = [(b"connection", b"close")]


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LimitsMiddleware:
    """Outermost ASGI middleware: `Tiffin.add_asgi_middleware(LimitsMiddleware)` first."""

    def __init__(self, app: ASGIApp, settings: LimitsSettings | None = None) -> None:
        self.app = app
        self.settings = settings or LimitsSettings()
        s = self.settings
        self._probes = frozenset(s.probe_paths)
        self._uploads = frozenset(s.upload_paths)
        self._in_flight = 0
        self._active = 0
        """Requests in flight that are not probes: `inference_active_requests`."""
        self._publish_active: Callable[[int], None] = self._first_publish
        self._body_watchdog: BodyWatchdog | None = None
        self._buckets = (
            TokenBuckets(s.rate_limit_per_s, s.rate_limit_burst, s.rate_limit_max_clients)
            if s.rate_limit_per_s > 0
            else None
        )
        self._entry: ASGIApp = self._guarded
        if s.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            self._entry = CORSMiddleware(
                self._guarded,
                allow_origins=s.cors_origins,
                allow_methods=s.cors_methods,
                allow_headers=s.cors_headers,
                allow_credentials=s.cors_allow_credentials,
                max_age=s.cors_max_age_s,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._entry(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.settings
        probe = scope["path"] in self._probes
        if self._buckets is not None and not probe:
            wait = self._buckets.take(self._client(scope), time.monotonic())
            if wait > 0:
                retry = str(max(1, math.ceil(wait))).encode()
                message = (
                    f"rate limit: more than {s.rate_limit_per_s:g} requests/s "
                    f"(burst {s.rate_limit_burst}) from this client"
                )
                await _answer(send, 429, message, [(b"retry-after", retry)])
                return
        try:
            body = await self._read_body(scope, receive)
        except BodyError as exc:
            await _answer(send, exc.status, exc.message, CLOSE)
            return
        if body is None:  # the client went away mid-body: nobody to answer
            return
        # Counted only once the body is here: the limit bounds work, not slow senders (those are
        # bounded by the body timeouts instead).
        if self._in_flight >= s.max_in_flight and not probe:
            message = f"overloaded: more than {s.max_in_flight} requests in flight on this worker"
            retry = str(s.overload_retry_after_s).encode()
            await _answer(send, 503, message, [(b"retry-after", retry)])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards only http.disconnect can arrive

        self._in_flight += 1
        if not probe:
            self._active += 1
            self._publish_active(self._active)
        try:
            await self.app(scope, replay, send)
        finally:
            self._in_flight -= 1
            if not probe:
                self._active -= 1
                self._publish_active(self._active)

    def _first_publish(self, count: int) -> None:
        """The gauge is made on the first request: BentoML sets the worker's multiprocess
        directory after the service module (and maybe this middleware) is set up."""
        from tiffin.metrics import active_requests_publisher

        self._publish_active = active_requests_publisher()
        self._publish_active(count)

    def _client(self, scope: Scope) -> str:
        if self.settings.trust_forwarded_for:
            forwarded = _header(scope, b"x-forwarded-for")
            if forwarded:
                return forwarded.split(b",", 1)[0].strip().decode("latin-1")
        client = scope.get("client")
        return str(client[0]) if client else "unknown"

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        s = self.settings
        limit = s.max_upload_bytes if scope["path"] in self._uploads else s.max_body_bytes
        content_type = declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                declared = value
            elif key == b"content-type":
                content_type = value
        if (
            content_type is not None
            and content_type[:19].lower() == b"multipart/form-data"
            and b"boundary=" not in content_type.lower()
        ):
            raise BodyError(400, "content-type: multipart/form-data needs a boundary")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise BodyError(400, "content-length: not an integer") from None
            if length > limit:
                raise BodyError(413, f"body: {length} bytes is over the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        watchdog = self._watchdog()
        task = asyncio.current_task()
        assert task is not None  # an ASGI app always runs in a task
        now = watchdog.loop.time()
        total_deadline = now + s.body_total_timeout_s
        try:
            while True:
                watchdog.deadlines[task] = min(now + s.body_idle_timeout_s, total_deadline)
                try:
                    message = await receive()
                except asyncio.CancelledError:
                    if not watchdog.expired(task):
                        raise
                    raise BodyError(
                        408,
                        f"body: not received in time ({size} bytes so far; idle limit "
                        f"{s.body_idle_timeout_s:g} s, total {s.body_total_timeout_s:g} s)",
                    ) from None
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        raise BodyError(413, f"body: over the limit of {limit} bytes")
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
                now = watchdog.loop.time()
        finally:
            watchdog.deadlines.pop(task, None)

    def _watchdog(self) -> BodyWatchdog:
        loop = asyncio.get_running_loop()
        if self._body_watchdog is None or self._body_watchdog.loop is not loop:
            s = self.settings
            period = min(s.body_idle_timeout_s, s.body_total_timeout_s) / 4
            self._body_watchdog = BodyWatchdog(loop, min(1.0, max(0.02, period)))
        return self._body_watchdog


class BodyWatchdog:
    """Body-read deadlines for every request of one worker, enforced by one periodic sweep.

    A timer per request (`asyncio.timeout`) costs ~15-20 us of event-loop work per request on this
    box (a heap entry created and cancelled each time), most of the middleware's cost; here a
    request only sets and pops a dict entry, and one task wakes every `period` seconds to cancel
    the reads past their deadline (so a deadline fires up to `period` late).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self.deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper = loop.create_task(self._sweep(), name="tiffin-body-watchdog")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            now = self.loop.time()
            for task, deadline in list(self.deadlines.items()):
                if now >= deadline and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """True (and the cancellation undone) when the watchdog cancelled `task`."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True
