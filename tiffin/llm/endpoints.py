"""Seed 002's LLM endpoints as plain handlers of the Tiffin application.

- `POST /generate` — text from a prompt (`"stream": true` for server-sent events)
- `POST /generate/structured` — a JSON value that validates against `json_schema` or the named
  `response_model`, always (constrained decoding in-process, instructor re-asks remotely)

A handler decodes its body, asks the worker's `LLM`, encodes the answer; errors are raised and
turned into responses by the one error table (`tiffin.http_errors`): a client mistake is a 4xx
naming the field, a down or failing backend a 503 carrying the breaker state.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tiffin.context import llm_of
from tiffin.llm.engine import Delta, Finished, Prompt
from tiffin.llm.errors import LLMError
from tiffin.llm.response_models import RESPONSE_MODELS
from tiffin.llm.runtime import LLM

SCHEMA_IN_PROMPT_MAX_CHARS = 1500


class GenerateRequest(BaseModel):
    prompt: str = Field(description="the text to continue (or the user turn when system is set)")
    system: str | None = Field(
        None, description="a system message; when set the chat template is applied"
    )
    max_tokens: int | None = Field(
        None, description="tokens to generate, 1..TIFFIN_LLM_MAX_TOKENS_LIMIT (default 128)"
    )
    temperature: float = Field(0.7, description="0 is greedy; up to 2")
    top_p: float = Field(1.0, description="nucleus sampling, (0, 1]")
    stop: list[str] | None = Field(None, description="up to 4 stop sequences")
    seed: int | None = Field(None, description="sampling seed for reproducible output, 0..2**63-1")
    stream: bool = Field(False, description="answer with server-sent events")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    text: str
    model: str
    engine: str
    finish_reason: str
    usage: Usage
    latency_ms: float
    time_to_first_token_ms: float | None
    tokens_per_second: float | None


class StructuredRequest(BaseModel):
    prompt: str = Field(description="what the JSON should be about")
    json_schema: dict[str, Any] | None = Field(
        None, description="a JSON Schema (Draft 2020-12) the output must validate against"
    )
    response_model: str | None = Field(
        None, description=f"or a named response model: {', '.join(sorted(RESPONSE_MODELS))}"
    )
    system: str | None = None
    max_tokens: int | None = Field(None, description="token budget (default 256)")
    temperature: float = Field(0.7, description="0 is greedy; up to 2")
    seed: int | None = Field(None, description="sampling seed, 0..2**63-1")


class StructuredResponse(BaseModel):
    data: Any = Field(description="the JSON value; it validates against the schema")
    valid: bool = Field(True, description="always true: invalid outputs are never returned")
    schema_name: str
    model: str
    engine: str
    attempts: int
    usage: Usage
    latency_ms: float


def _usage(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def structured_instruction(schema: dict[str, Any], system: str | None) -> str:
    compact = json.dumps(schema, separators=(",", ":"))
    text = "Reply with one JSON value and nothing else."
    if len(compact) <= SCHEMA_IN_PROMPT_MAX_CHARS:
        text += f" It must validate against this JSON Schema: {compact}"
    return f"{system}\n\n{text}" if system else text


async def generate(request: Request, req: GenerateRequest) -> Response | GenerateResponse:
    llm = llm_of(request)
    started = time.monotonic()
    prompt = llm.prompt_from_text(req.prompt)
    if req.system is not None:
        llm.prompt_from_text(req.system, "system")
        prompt = Prompt(
            messages=(
                {"role": "system", "content": req.system},
                {"role": "user", "content": req.prompt},
            )
        )
    params = llm.params(req.max_tokens, req.temperature, req.top_p, req.stop, req.seed)
    if req.stream:
        await llm.check(prompt, params)  # a 4xx or 503 before the stream starts
        return StreamingResponse(
            _sse(llm, llm.stream(prompt, params, checked=True), started),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    text, finished = await llm.generate(prompt, params)
    return GenerateResponse(
        text=text,
        model=llm.model_id,
        engine=llm.engine_kind,
        finish_reason=finished.finish_reason,
        usage=_usage(finished),
        latency_ms=round((time.monotonic() - started) * 1000, 3),
        time_to_first_token_ms=_ms(finished.time_to_first_token_s),
        tokens_per_second=(
            round(finished.tokens_per_second, 2) if finished.tokens_per_second else None
        ),
    )


async def generate_structured(request: Request, req: StructuredRequest) -> StructuredResponse:
    llm = llm_of(request)
    started = time.monotonic()
    llm.prompt_from_text(req.prompt)
    target = llm.target(req.json_schema, req.response_model)
    prompt = Prompt(
        messages=(
            {"role": "system", "content": structured_instruction(target.schema, req.system)},
            {"role": "user", "content": req.prompt},
        )
    )
    params = llm.params(req.max_tokens, req.temperature, 1.0, None, req.seed, structured=True)
    result = await llm.structured(prompt, params, target)
    return StructuredResponse(
        data=result.value,
        schema_name=target.name,
        model=llm.model_id,
        engine=llm.engine_kind,
        attempts=result.attempts,
        usage=_usage(result.finished),
        latency_ms=round((time.monotonic() - started) * 1000, 3),
    )


async def _sse(llm: LLM, events: AsyncIterator[Any], started: float) -> AsyncIterator[str]:
    """`data: {"text": ...}` per delta, then `data: {"done": true, ...}` with the usage."""
    try:
        async for event in events:
            if isinstance(event, Delta):
                yield f"data: {json.dumps({'text': event.text}, ensure_ascii=False)}\n\n"
            else:
                done = {
                    "done": True,
                    "finish_reason": event.finish_reason,
                    "usage": _usage(event).model_dump(),
                    "model": llm.model_id,
                    "engine": llm.engine_kind,
                    "latency_ms": round((time.monotonic() - started) * 1000, 3),
                    "time_to_first_token_ms": _ms(event.time_to_first_token_s),
                }
                yield f"data: {json.dumps(done)}\n\n"
    except LLMError as exc:
        yield f"data: {json.dumps({'error': exc.message, **exc.detail}, default=str)}\n\n"
