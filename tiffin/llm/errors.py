"""LLM errors. Client errors reuse `tiffin.errors.InvalidInput` (422); these are the 5xx ones.

BentoML replaces the message of any 5xx `BentoMLException` with a generic sentence, so the LLM
endpoints turn these into JSON responses themselves (`to_response`): a 503 must say which
component is down and carry the breaker state, or it is useless to the caller.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from tiffin.errors import TiffinError


class LLMError(TiffinError):
    """Base of the LLM's server-side errors; `detail` is added to the JSON body."""

    error_code = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.detail}

    @property
    def retry_after(self) -> float | None:
        value = self.detail.get("retry_after_s")
        return float(value) if isinstance(value, int | float) else None


class LLMUnavailable(LLMError):
    """The LLM cannot answer now: disabled, model not loaded, backend down, breaker open."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class LLMBusy(LLMUnavailable):
    """The in-process engine's queue is full or the request waited too long in it."""


class BackendRejected(LLMError):
    """The remote backend answered the request with a client error (e.g. unknown model)."""

    error_code = HTTPStatus.BAD_GATEWAY


class StructuredOutputFailed(LLMError):
    """No schema-valid output after every attempt (remote re-asks exhausted)."""

    error_code = HTTPStatus.BAD_GATEWAY


class BadRequest(Exception):
    """A client mistake on the OpenAI-compatible API, with the parameter it concerns."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def to_response(exc: LLMError) -> Any:
    """A Starlette JSONResponse with the error's status, body and Retry-After."""
    from starlette.responses import JSONResponse

    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(exc.body(), status_code=int(exc.error_code), headers=headers)
