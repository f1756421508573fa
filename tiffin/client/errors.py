"""Typed client errors: one class per status the service answers, each carrying its `error`.

The service's bodies are `{"error": "<field>: <what is wrong>", ...}`; the message is the
exception's text, so `except NotFound as exc: print(exc)` shows what the service said.
"""

from __future__ import annotations

from typing import Any


class TiffinClientError(Exception):
    """Base class. `status` is None when no answer came back (connection, timeout)."""

    status: int | None = None

    def __init__(
        self,
        message: str,
        status: int | None = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.body = body
        self.request_id = request_id


class TransportError(TiffinClientError):
    """The service could not be reached, or did not answer in time (after every retry)."""


class BadRequest(TiffinClientError):
    status = 400


class Unauthorized(TiffinClientError):
    status = 401


class Forbidden(TiffinClientError):
    status = 403


class NotFound(TiffinClientError):
    status = 404


class Conflict(TiffinClientError):
    status = 409


class UnprocessableEntity(TiffinClientError):
    status = 422


class TooManyRequests(TiffinClientError):
    status = 429


class ServerError(TiffinClientError):
    """Any 5xx without a class of its own."""

    status = 500


class BadGateway(ServerError):
    status = 502


class ServiceUnavailable(ServerError):
    status = 503


BY_STATUS: dict[int, type[TiffinClientError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        UnprocessableEntity,
        TooManyRequests,
        ServerError,
        BadGateway,
        ServiceUnavailable,
    )
}


def error_for(status: int, body: Any, request_id: str | None = None) -> TiffinClientError:
    """The typed error for an HTTP answer; its message is the service's `error`."""
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str):
        detail = body.get("detail") if isinstance(body, dict) else None
        message = str(detail or body or f"HTTP {status}")
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else TiffinClientError)
    return cls(message, status=status, body=body, request_id=request_id)
