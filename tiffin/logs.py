"""JSON logs (structlog, as seed 000 asks) with the request id, and no personal data.

`configure_logging()` sends Tiffin's loggers, structlog's and the stdlib `logging` ones named, to
one JSON line per event: timestamp, level, logger, event, the request's bound context
(`request_id`, and `model`, `version` once the pipeline binds them) and any fields given.

Personal data never reaches a log line: card ids, user ids and session ids are replaced by a
keyed hash (HMAC-SHA256 with `TIFFIN_LOG_PII_HASH_KEY`, so equal ids stay correlatable) or
dropped when no key is set (a plain hash of a `card_00001234`-style id is reversed by trying
every id); IP addresses and user agents are always dropped, also inside message strings.

`RequestIdMiddleware` is a pure-ASGI middleware: it takes the caller's `X-Request-ID` (or makes
one), binds it for every log line of the request, returns it on the response, and, when
`TIFFIN_LOG_REQUESTS` is on, writes one `request` line with status and latency.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import IO, Any

import orjson
import structlog
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# Candidates only: a match is masked when `ipaddress` parses it, so "14:45:00" stays a time.
_IP_CANDIDATE = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}")
HASHED_FIELDS = frozenset({"card_id", "user_id", "session_id", "customer_id", "account_id"})
DROPPED_FIELDS = frozenset(
    {"ip", "ip_address", "client_ip", "remote_addr", "client", "user_agent", "email"}
)
DROPPED = "[dropped]"


class LogSettings(BaseSettings):
    """Tiffin's log output. The level is `ServerSettings.log_level` (`LOG_LEVEL`)."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_LOG_", extra="ignore")

    json_output: bool = Field(True, validation_alias="TIFFIN_LOG_JSON")
    """One JSON object per line (seed 000); false gives structlog's readable console lines."""

    pii_hash_key: SecretStr | None = None
    """Key of the HMAC that replaces card, user and session ids in logs. Unset: those ids are
    dropped (an unkeyed hash of a guessable id is no protection)."""

    requests: bool = False
    """One `request` line per HTTP request (method, path, status, latency, model, version).
    Off by default: serialising a line costs about as much CPU as scoring a request."""


def _hash(value: object, key: bytes) -> str:
    return hmac.new(key, str(value).encode(), hashlib.sha256).hexdigest()[:16]


def _mask_ip(match: re.Match[str]) -> str:
    try:
        ipaddress.ip_address(match.group(0))
    except ValueError:
        return match.group(0)
    return "[ip]"


def scrub_text(text: str) -> str:
    """IP addresses inside free text (an f-string log message) replaced by `[ip]`."""
    if "." not in text and ":" not in text:
        return text
    return _IP_CANDIDATE.sub(_mask_ip, text)


class PiiScrubber:
    """structlog processor: hashes or drops personal fields at any depth, masks IPs in text."""

    def __init__(self, hash_key: SecretStr | None) -> None:
        self.key = hash_key.get_secret_value().encode() if hash_key else None

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return scrub_text(value)
        if isinstance(value, dict):
            return {k: self.field(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def field(self, name: object, value: Any) -> Any:
        if name in DROPPED_FIELDS:
            return DROPPED
        if name in HASHED_FIELDS and value is not None:
            return _hash(value, self.key) if self.key else DROPPED
        return self.scrub(value)

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for name in list(event_dict):
            event_dict[name] = self.field(name, event_dict[name])
        return event_dict


def _orjson_dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def processors(settings: LogSettings) -> list[Any]:
    """The chain every event goes through before rendering (structlog and stdlib alike)."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.format_exc_info,
        PiiScrubber(settings.pii_hash_key),  # after tracebacks are text, so they are scrubbed too
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(
    level: str | None = None,
    settings: LogSettings | None = None,
    loggers: Iterable[str] = ("tiffin",),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Set up structlog and route the named stdlib loggers through it; returns the handler.

    Call once per process (each worker), before serving. `loggers` keep their own level and stop
    propagating, so a line is written once even when BentoML configures the root logger.
    """
    settings = settings or LogSettings()
    if level is None:
        from tiffin.settings import server_settings

        level = server_settings().log_level
    chain = processors(settings)
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if settings.json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*chain, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=chain,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    for name in loggers:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_tiffin", False)]:
            logger.removeHandler(old)
        handler._tiffin = True  # type: ignore[attr-defined]  # marks ours, for reconfiguration
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return handler


def get_logger(name: str = "tiffin") -> Any:
    return structlog.stdlib.get_logger(name)


def bind(**fields: Any) -> None:
    """Add fields (e.g. `model`, `version`) to every later log line of the current request."""
    structlog.contextvars.bind_contextvars(**fields)


def _request_id(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            if _VALID_REQUEST_ID.match(value):
                return str(value.decode())
            break  # a malformed id (header injection, huge) is replaced, not echoed
    return os.urandom(16).hex()  # as unique as uuid4().hex, a third of its cost


class RequestIdMiddleware:
    """Accepts or makes `X-Request-ID`, binds it to the log context, returns it; pure ASGI so
    the request body streams through untouched."""

    def __init__(self, app: Any, settings: LogSettings | None = None) -> None:
        self.app = app
        self.log_requests = (settings or LogSettings()).requests
        self.log = get_logger("tiffin.requests")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        # Each request runs in a task of its own with a copy of the context: binding is enough,
        # and resetting to the copy's values (not clearing every variable) ends the request.
        bound = structlog.contextvars.bind_contextvars(request_id=request_id)
        header = (REQUEST_ID_HEADER, request_id.encode())
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    h for h in message.get("headers", ()) if h[0].lower() != REQUEST_ID_HEADER
                ]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_requests:
                self.log.info(
                    "request",
                    method=scope.get("method"),
                    path=scope.get("path"),
                    status=status,
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                )
            structlog.contextvars.reset_contextvars(**bound)
