"""One table from typed errors to HTTP responses, for every route family.

A handler raises; `problem_of` finds the first row of `ERRORS` whose type matches and turns the
exception into a `Problem` (status, message naming the field, extra body fields, headers). The
route family only chooses the body's shape: Tiffin's `{"error": "<field>: <problem>", ...}`
(`tiffin_body`) or OpenAI's `{"error": {"message", "type", "param", "code"}}` (`openai_body`).
Anything not in the table is a 500 whose body never carries a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from tiffin.auth import AuthError, authorize
from tiffin.context import WORKER
from tiffin.errors import TiffinError
from tiffin.llm.errors import BadRequest, LLMError, LLMUnavailable

log = logging.getLogger("tiffin.http")
UNEXPECTED = "An unexpected error has occurred, please check the server log."


@dataclass(frozen=True)
class Problem:
    status: int
    message: str
    detail: list[Any] | None = None
    """Field-level validation errors, for clients that want more than the message."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """More body fields (the LLM's breaker state, the component that is down)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    param: str | None = None


class BodyError(Exception):
    """The body is not JSON, or not the JSON object the route takes."""


def describe_errors(detail: list[Any]) -> str:
    """Pydantic error dicts as one message naming each field: `amount: Input should be ...`."""
    parts = []
    for err in detail[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _validation(exc: ValidationError) -> Problem:
    detail = exc.errors(include_context=False, include_input=False, include_url=False)
    return Problem(400, describe_errors(detail), detail=detail)


def _retry_after(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))} if seconds else {}


def _llm(exc: LLMError) -> Problem:
    return Problem(
        int(exc.error_code), exc.message, extra=exc.detail, headers=_retry_after(exc.retry_after)
    )


def _auth(exc: AuthError) -> Problem:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return Problem(exc.status, exc.message, headers=headers)


def _tiffin(exc: TiffinError) -> Problem:
    message = str(exc)
    param = message.split(":", 1)[0] if ":" in message else None
    return Problem(int(exc.error_code), message, param=param)


ERRORS: list[tuple[type[BaseException], Callable[[Any], Problem]]] = [
    (ValidationError, _validation),
    (BodyError, lambda exc: Problem(400, str(exc))),
    (AuthError, _auth),
    (BadRequest, lambda exc: Problem(exc.status, exc.message, param=exc.param)),
    (LLMError, _llm),
    (TiffinError, _tiffin),
]


def problem_of(exc: BaseException) -> Problem:
    for kind, convert in ERRORS:
        if isinstance(exc, kind):
            problem = convert(exc)
            if problem.status >= 500:
                log.warning("request failed: %s", problem.message)
            else:  # one line, no traceback: bad input must not flood the logs (issue 11)
                log.info("client error %d: %s", problem.status, problem.message)
            return problem
    log.error("unexpected error", exc_info=exc)
    return Problem(500, UNEXPECTED)


def tiffin_body(problem: Problem) -> dict[str, Any]:
    body: dict[str, Any] = {"error": problem.message}
    if problem.detail is not None:
        body["detail"] = problem.detail
    body.update(problem.extra)
    return body


def openai_body(problem: Problem, exc: BaseException) -> dict[str, Any]:
    """OpenAI's error shape; its API answers every client mistake with 400 or 404."""
    if isinstance(exc, LLMUnavailable):
        kind = "service_unavailable"
    elif problem.status >= 500:
        kind = "server_error"
    elif problem.status == 404 and isinstance(exc, BadRequest):
        kind = "not_found_error"
    elif problem.status == 401:
        kind = "authentication_error"
    else:
        kind = "invalid_request_error"
    return {
        "error": {
            "message": problem.message,
            "type": kind,
            "param": problem.param,
            "code": None,
            **problem.extra,
        }
    }


def openai_status(problem: Problem, exc: BaseException) -> int:
    if 400 <= problem.status < 500 and not isinstance(exc, BadRequest | AuthError):
        return 400
    return problem.status


def decode(schema: type[BaseModel], body: bytes) -> Any:
    """The body as `schema`, or the error that names what is wrong with it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(f"body: Invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BodyError("body: Input should be an object")
    return schema.model_validate(data)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str, option=orjson.OPT_SERIALIZE_NUMPY)


def problem_response(exc: BaseException) -> Response:
    problem = problem_of(exc)
    return JSON(tiffin_body(problem), status_code=problem.status, headers=dict(problem.headers))


Handler = Callable[[Request], Awaitable[Any]]


def endpoint(
    handler: Handler, scope: str | None = None
) -> Callable[[Request], Awaitable[Response]]:
    """A Tiffin JSON route: bearer-token check when `scope` is given, the handler's result as
    JSON (a Response passes through), any raised error through the table above."""

    async def run(request: Request) -> Response:
        try:
            if scope is not None:
                authorize(request.headers.get("authorization"), scope, request.scope[WORKER].auth)
            result = await handler(request)
        except Exception as exc:
            return problem_response(exc)
        if isinstance(result, Response):
            return result
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json")
        return JSON(result)

    return run


def body_endpoint(
    schema: type[BaseModel], handler: Callable[[Request, Any], Awaitable[Any]]
) -> Callable[[Request], Awaitable[Response]]:
    """A Tiffin JSON route whose body is decoded as `schema` (400 naming the field)."""

    async def decoded(request: Request) -> Any:
        return await handler(request, decode(schema, await request.body()))

    return endpoint(decoded)


async def send_json(send: Any, status: int, body: bytes, headers: Any = ()) -> None:
    """A JSON answer written straight to ASGI (for the routes answered below Starlette)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
