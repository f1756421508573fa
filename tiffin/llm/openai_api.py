"""An OpenAI-compatible API for Tiffin's LLM, so `openai` and `instructor` clients work against it.

Mounted at `/openai` by the entry service, which makes the client base URL
`http://<host>:3000/openai/v1` (seed 004 already owns `GET /v1/models`). Routes, relative to the
mount:

- `GET  /v1/models`, `GET /v1/models/{id}`
- `POST /v1/chat/completions` — `messages`, `max_tokens` / `max_completion_tokens`,
  `temperature`, `top_p`, `stop`, `seed`, `stream` (+ `stream_options.include_usage`),
  `response_format` `text` | `json_object` | `json_schema` (constrained: the reply always
  validates), and `tools` with a forced `tool_choice` (the arguments are constrained to the
  function's parameters; this is what instructor's default TOOLS mode sends).
- `POST /v1/completions` — raw text completion, streaming or not.

Errors use OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`; 400 for a bad
request (the message names the field), 404 for an unknown model, 401 without the configured key,
503 (with the breaker state) when the LLM is down.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tiffin.context import llm_of
from tiffin.errors import InvalidInput
from tiffin.http_errors import openai_body, openai_status, problem_of
from tiffin.llm.engine import Delta, Finished, GenerationParams, Prompt, StructuredTarget
from tiffin.llm.errors import BadRequest, LLMError
from tiffin.llm.runtime import LLM

# `json_object` mode: any flat JSON object (keys bounded by the decoding limits).
JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {
        "anyOf": [
            {"type": "string"},
            {"type": "integer"},
            {"type": "number"},
            {"type": "boolean"},
            {"type": "null"},
        ]
    },
}
CREATED = int(time.time())


def _error(status: int, message: str, kind: str, param: str | None = None, **extra: Any) -> Any:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None, **extra}}
    headers = {}
    retry = extra.get("retry_after_s")
    if isinstance(retry, int | float) and retry > 0:
        headers["Retry-After"] = str(max(1, round(retry)))
    return JSONResponse(body, status_code=status, headers=headers)


def _from_exception(exc: Exception) -> Response:
    problem = problem_of(exc)
    return JSONResponse(
        openai_body(problem, exc),
        status_code=openai_status(problem, exc),
        headers=dict(problem.headers),
    )


def _authorized(request: Request, llm: LLM) -> bool:
    key = llm.settings.api_key
    if key is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token, key.get_secret_value())


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc.msg}") from exc
    except RecursionError:  # the stdlib parser recurses per nesting level
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        raise BadRequest(f"the request body cannot be read: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _check_model(body: dict[str, Any], llm: LLM) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: required (see GET /v1/models)", "model")
    if model != llm.model_id:
        raise BadRequest(
            f"model: {model!r} does not exist here; this server serves {llm.model_id!r}",
            "model",
            status=404,
        )
    return model


def _params(body: dict[str, Any], llm: LLM, structured: bool) -> GenerationParams:
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("n: only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return llm.params(
        max_tokens,
        body.get("temperature", 1.0),
        body.get("top_p", 1.0),
        body.get("stop"),
        body.get("seed"),
        structured=structured,
        field=field,
    )


def _target(body: dict[str, Any], llm: LLM) -> tuple[StructuredTarget | None, str | None]:
    """(target, tool name): from a forced tool call, or from response_format."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRequest("tools: must be a list of tool objects", "tools")
        forced: str | None = None
        if isinstance(choice, dict):
            forced = (choice.get("function") or {}).get("name")
            if not forced:
                raise BadRequest("tool_choice: function.name is required", "tool_choice")
        elif choice == "required" and len(tools) == 1:
            forced = (tools[0].get("function") or {}).get("name")
        elif choice == "required":
            raise BadRequest(
                "tool_choice: 'required' with several tools is not supported; name the function",
                "tool_choice",
            )
        if forced:
            for tool in tools:
                function = tool.get("function") or {}
                if function.get("name") == forced:
                    schema = function.get("parameters") or {"type": "object", "properties": {}}
                    return llm.target(schema, None, forced, "tools.function.parameters"), forced
            raise BadRequest(f"tool_choice: no tool named {forced!r} in tools", "tool_choice")
    fmt = body.get("response_format")
    if fmt is None:
        return None, None
    if not isinstance(fmt, dict):
        raise BadRequest("response_format: must be an object", "response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return llm.target(JSON_OBJECT_SCHEMA, None, "json_object"), None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise BadRequest(
                "response_format.json_schema: must be an object with a 'schema'",
                "response_format.json_schema",
            )
        name = spec.get("name") if isinstance(spec.get("name"), str) else "response"
        return llm.target(spec["schema"], None, name, "response_format.json_schema.schema"), None
    raise BadRequest(
        f"response_format.type: {kind!r} is not one of text, json_object, json_schema",
        "response_format.type",
    )


def _usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def list_models(request: Request) -> Response:
    llm = llm_of(request)
    if not _authorized(request, llm):
        return _error(401, "missing or wrong API key", "authentication_error")
    return JSONResponse({"object": "list", "data": [_model_card(llm)]})


def _model_card(llm: LLM) -> dict[str, Any]:
    return {"id": llm.model_id, "object": "model", "created": CREATED, "owned_by": "tiffin"}


async def get_model(request: Request) -> Response:
    llm = llm_of(request)
    if not _authorized(request, llm):
        return _error(401, "missing or wrong API key", "authentication_error")
    if request.path_params["model"] != llm.model_id:
        return _error(
            404,
            f"model {request.path_params['model']!r} does not exist; this server serves "
            f"{llm.model_id!r}",
            "not_found_error",
            "model",
        )
    return JSONResponse(_model_card(llm))


async def chat_completions(request: Request) -> Response:
    llm = llm_of(request)
    if not _authorized(request, llm):
        return _error(401, "missing or wrong API key", "authentication_error")
    try:
        body = await _body(request)
        model = _check_model(body, llm)
        prompt = llm.prompt_from_messages(body.get("messages"))
        target, tool = _target(body, llm)
        params = _params(body, llm, structured=target is not None)
        stream = bool(body.get("stream", False))
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if stream:
            await llm.check(prompt, params, target)  # 4xx/503 before the stream starts
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _chat_stream(
                    llm, prompt, params, target, tool, model, completion_id, include_usage
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        if target is not None:
            result = await llm.structured(prompt, params, target, "openai_chat")
            text, finished = result.text, result.finished
        else:
            text, finished = await llm.generate(prompt, params, "openai_chat")
    except (BadRequest, InvalidInput, LLMError) as exc:
        return _from_exception(exc)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    finish_reason = finished.finish_reason
    if tool is not None:
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": tool, "arguments": text},
            }
        ]
        finish_reason = "tool_calls"
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
            ],
            "usage": _usage(finished),
        }
    )


async def _chat_stream(
    llm: LLM,
    prompt: Prompt,
    params: GenerationParams,
    target: StructuredTarget | None,
    tool: str | None,
    model: str,
    completion_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }
        )

    if tool is not None:
        call = {
            "index": 0,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": tool, "arguments": ""},
        }
        yield chunk({"role": "assistant", "content": None, "tool_calls": [call]})
    else:
        yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in llm.stream(prompt, params, target, "openai_chat", checked=True):
            if isinstance(event, Delta):
                if tool is not None:
                    yield chunk(
                        {"tool_calls": [{"index": 0, "function": {"arguments": event.text}}]}
                    )
                else:
                    yield chunk({"content": event.text})
                continue
            yield chunk({}, "tool_calls" if tool is not None else event.finish_reason)
            if include_usage:
                yield _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(event),
                    }
                )
    except (InvalidInput, LLMError) as exc:
        message = exc.message if isinstance(exc, LLMError) else str(exc)
        yield _sse({"error": {"message": message, "type": "server_error", "param": None}})
    yield "data: [DONE]\n\n"


async def completions(request: Request) -> Response:
    llm = llm_of(request)
    if not _authorized(request, llm):
        return _error(401, "missing or wrong API key", "authentication_error")
    try:
        body = await _body(request)
        model = _check_model(body, llm)
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if not isinstance(raw, str):
            raise BadRequest("prompt: must be a string (batches are not supported)", "prompt")
        if body.get("echo") or body.get("suffix") or body.get("best_of", 1) not in (1, None):
            raise BadRequest("echo, suffix and best_of are not supported", "echo")
        prompt = llm.prompt_from_text(raw)
        params = _params(body, llm, structured=False)
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            await llm.check(prompt, params)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _completion_stream(llm, prompt, params, model, completion_id, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        text, finished = await llm.generate(prompt, params, "openai_completions")
    except (BadRequest, InvalidInput, LLMError) as exc:
        return _from_exception(exc)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "finish_reason": finished.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(finished),
        }
    )


async def _completion_stream(
    llm: LLM,
    prompt: Prompt,
    params: GenerationParams,
    model: str,
    completion_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(text: str, finish: str | None = None) -> str:
        return _sse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            }
        )

    try:
        async for event in llm.stream(prompt, params, None, "openai_completions", checked=True):
            if isinstance(event, Delta):
                yield chunk(event.text)
                continue
            yield chunk("", event.finish_reason)
            if include_usage:
                yield _sse(
                    {
                        "id": completion_id,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(event),
                    }
                )
    except (InvalidInput, LLMError) as exc:
        message = exc.message if isinstance(exc, LLMError) else str(exc)
        yield _sse({"error": {"message": message, "type": "server_error", "param": None}})
    yield "data: [DONE]\n\n"


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
