"""Client errors are logged as what they are: one INFO line, no traceback.

BentoML 1.4.39's API wrapper (`_bentoml_impl.server.app.ServiceAppFactory.api_endpoint_wrapper`)
calls `bentoml._internal.server.http_app.log_exception` for *every* exception it turns into a
response, including pydantic validation failures (400) and `BentoMLException`s with a 4xx status
(Tiffin's `InvalidInput`, `ModelNotFound`, ...): `logger.error("Exception on %s [%s]",
exc_info=True)`, a full traceback per bad request. A client sending bad requests in a loop could
flood the logs and bury real server errors. This filter rewrites those records in place: INFO,
the status and the one-line reason appended, no traceback. Server errors (5xx, unexpected
exceptions) keep their ERROR level and traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

# The logger `log_exception` writes to (bentoml/_internal/server/http_app.py).
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"
# Background loops that log a traceback on every failed tick while a dependency is down.
BACKGROUND_LOGGERS = ("tiffin.lifecycle",)


def client_error_status(exc: BaseException | None) -> int | None:
    """The 4xx status BentoML answers for `exc`, or None when it is a server error."""
    if exc is None:
        return None
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400
    status: Any = getattr(exc, "error_code", None)  # BentoMLException and subclasses
    if status is None:
        status = getattr(exc, "status_code", None)  # starlette.exceptions.HTTPException
    try:
        code = int(status)
    except (TypeError, ValueError):
        return None
    return code if 400 <= code < 500 else None


class ClientErrorLogFilter(logging.Filter):
    """Downgrades records about client errors to INFO without traceback."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = client_error_status(exc)
        if status is None:
            return True
        one_line = " ".join(str(exc).split())[:300]
        where = record.getMessage().removeprefix("Exception on ")
        record.msg = f"client error {status} on {where}: {type(exc).__name__}: {one_line}"
        record.args = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        # The logger's level was checked against ERROR before the record existed.
        return self.logger.isEnabledFor(logging.INFO)


def install_client_error_log_filter(logger_name: str = BENTOML_HTTP_LOGGER) -> ClientErrorLogFilter:
    """Idempotent: installs the filter once on `logger_name` and returns it."""
    logger = logging.getLogger(logger_name)
    for existing in logger.filters:
        if isinstance(existing, ClientErrorLogFilter):
            return existing
    installed = ClientErrorLogFilter(logger)
    logger.addFilter(installed)
    return installed


class RepeatedTracebackFilter(logging.Filter):
    """The same failure from a background loop is logged with its traceback once per window.

    The lifecycle poller ticks every `TIFFIN_TRAFFIC_POLL_INTERVAL_S` and logs
    `log.exception("lifecycle tick failed")` each time Redis is unreachable: measured 94 full
    tracebacks in 10 s of Redis faults (tests/reliability). Within `window_s` of a traceback,
    repeats of the same message and exception type are dropped and counted; the next one logged
    says how many were dropped. Different failures are never merged.
    """

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        key = (record.name, str(record.msg), type(record.exc_info[1]).__name__)
        now = self.clock()
        last, dropped = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.window_s:
            self._seen[key] = (last, dropped + 1)
            return False
        self._seen[key] = (now, 0)
        if dropped:
            record.msg = (
                f"{record.msg} (the same failure {dropped} more times since the last report)"
            )
        return True


def install_repeated_traceback_filter(
    logger_names: tuple[str, ...] = BACKGROUND_LOGGERS, window_s: float = 60.0
) -> None:
    """Idempotent: one RepeatedTracebackFilter per named logger."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatedTracebackFilter) for f in logger.filters):
            logger.addFilter(RepeatedTracebackFilter(window_s))
