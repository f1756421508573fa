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
from typing import Any

# The logger `log_exception` writes to (bentoml/_internal/server/http_app.py).
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"


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
        record.msg = (
            f"{record.getMessage()}: client error {status}: {type(exc).__name__}: {one_line}"
        )
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
