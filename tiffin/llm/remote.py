"""The remote engine: any OpenAI-compatible server (Ollama, vLLM, mlx_lm.server, another Tiffin).

Text goes through the official `openai` client (bounded retries with backoff, connect and read
timeouts). Structured calls go through instructor, which validates the reply with pydantic and
re-asks the model with the validation error, at most `structured_max_reasks` times. A raw JSON
Schema becomes a pydantic model whose JSON Schema *is* that schema and whose validator is the
`jsonschema` check, so re-asks work the same for both.

Failures are classified for the circuit breaker: connection errors, timeouts and 5xx/429 are
`BackendFailure`s (they count); other 4xx answers are `BackendRejected` (the backend is up, the
request is wrong for it — e.g. an unknown model), which do not.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import openai
from pydantic import BaseModel, RootModel, model_validator

from tiffin.llm.engine import (
    BackendFailure,
    Delta,
    Engine,
    Event,
    Finished,
    GenerationParams,
    OutputInvalid,
    Prompt,
    StructuredResult,
    StructuredTarget,
)
from tiffin.llm.errors import BackendRejected, LLMError, StructuredOutputFailed
from tiffin.llm.metrics import llm_metrics
from tiffin.llm.settings import LLMSettings

log = logging.getLogger("tiffin.llm")


def classify(exc: BaseException, base_url: str) -> LLMError:
    """The LLMError an OpenAI-client exception stands for."""
    where = {"component": "llm", "backend": base_url}
    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError | TimeoutError):
        return BackendFailure(f"the LLM backend at {base_url} timed out", where)
    if isinstance(exc, openai.APIConnectionError):
        return BackendFailure(f"cannot reach the LLM backend at {base_url}: {exc}", where)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"the LLM backend answered {status}: {_message(exc)}"
        if status >= 500 or status == 429:
            return BackendFailure(message, where)
        return BackendRejected(message, {**where, "backend_status": status})
    return BackendFailure(f"the LLM backend call failed: {type(exc).__name__}: {exc}", where)


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:300]
    return str(exc)[:300]


def raw_schema_model(target: StructuredTarget) -> type[BaseModel]:
    """A pydantic model standing for a raw JSON Schema, for instructor: its `model_json_schema`
    is the schema itself and validating it runs the JSON Schema check (so failures re-ask)."""
    schema = target.schema
    name = "".join(c for c in target.name.title() if c.isalnum()) or "Response"

    class RawSchema(RootModel[Any]):
        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            # a fresh copy each time: instructor adds keys (description) to what it gets
            return {"title": name, **copy.deepcopy(schema)}

        @model_validator(mode="after")
        def _matches_schema(self) -> RawSchema:
            try:
                target.validate_value(self.root)
            except OutputInvalid as exc:
                raise ValueError(str(exc)) from exc
            return self

    RawSchema.__name__ = RawSchema.__qualname__ = name
    return RawSchema


class RemoteEngine(Engine):
    kind = "remote"

    def __init__(self, settings: LLMSettings, client: openai.AsyncOpenAI | None = None) -> None:
        if not settings.remote_base_url:
            raise ValueError("RemoteEngine needs remote_base_url")
        self.settings = settings
        self.base_url = settings.remote_base_url.rstrip("/")
        self.model_id = settings.remote_model or settings.model_name
        self.model_version = "remote"  # the backend's weights: not known here
        self.client = client or openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=settings.remote_api_key.get_secret_value(),
            timeout=openai.Timeout(
                settings.remote_timeout_s, connect=settings.remote_connect_timeout_s
            ),
            max_retries=settings.remote_max_retries,
        )
        self._last_probe: tuple[float, str | None] | None = None

    def _messages(self, prompt: Prompt) -> list[dict[str, str]]:
        if prompt.messages is not None:
            return [dict(m) for m in prompt.messages]
        return [{"role": "user", "content": prompt.text or ""}]

    def _deadline(self) -> float:
        return self.settings.request_timeout_s

    async def stream(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget | None = None
    ) -> AsyncIterator[Event]:
        if target is not None:
            # A streamed reply cannot be re-asked; ask for a validated object, then stream it.
            result = await self.structured(prompt, params, target)
            yield Delta(result.text)
            yield result.finished
            return
        arrived = time.monotonic()
        common: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
        }
        if params.stop:
            common["stop"] = list(params.stop)
        if params.seed is not None:
            common["seed"] = params.seed
        first_at: float | None = None
        last_at = arrived
        chunks = 0
        finish = "stop"
        usage: Any = None
        try:
            async with asyncio.timeout(self._deadline()):
                if prompt.messages is not None:
                    response: Any = await self.client.chat.completions.create(
                        messages=cast(Any, self._messages(prompt)), **common
                    )
                else:
                    response = await self.client.completions.create(
                        prompt=prompt.text or "", **common
                    )
                async for chunk in response:
                    if getattr(chunk, "usage", None):
                        usage = chunk.usage
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    text = (
                        choice.delta.content if prompt.messages is not None else choice.text
                    ) or ""
                    if choice.finish_reason:
                        finish = choice.finish_reason
                    if text:
                        now = time.monotonic()
                        first_at = first_at or now
                        last_at = now
                        chunks += 1
                        yield Delta(text)
        except (openai.OpenAIError, TimeoutError) as exc:
            raise classify(exc, self.base_url) from exc
        yield Finished(
            finish_reason=finish,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or chunks),
            time_to_first_token_s=(first_at - arrived) if first_at else None,
            decode_s=(last_at - first_at) if first_at else 0.0,
            total_s=time.monotonic() - arrived,
        )

    async def structured(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget
    ) -> StructuredResult:
        import instructor

        arrived = time.monotonic()
        mode = {
            "json_schema": instructor.Mode.JSON_SCHEMA,
            "json": instructor.Mode.JSON,
            "tools": instructor.Mode.TOOLS,
            "md_json": instructor.Mode.MD_JSON,
        }[self.settings.instructor_mode]
        is_object = target.schema.get("type") == "object" and "properties" in target.schema
        if mode == instructor.Mode.TOOLS and target.model is None and not is_object:
            mode = instructor.Mode.JSON_SCHEMA  # function parameters must be an object schema
        client = instructor.from_openai(self.client, mode=mode)
        parse_errors: list[str] = []

        def on_parse_error(error: Exception, *args: Any, **kwargs: Any) -> None:
            parse_errors.append(str(error)[:200])
            llm_metrics().structured_failures.labels(
                self.model_id, self.model_version, self.kind, "attempt"
            ).inc()

        client.on("parse:error", on_parse_error)
        model = target.model or raw_schema_model(target)
        kwargs: dict[str, Any] = {
            "model": self.model_id,
            "messages": self._messages(prompt),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        reasks = self.settings.structured_max_reasks
        try:
            async with asyncio.timeout(self._deadline()):
                obj, completion = await client.chat.completions.create_with_completion(
                    response_model=model, max_retries=reasks, **kwargs
                )
        except (openai.OpenAIError, TimeoutError) as exc:
            raise classify(exc, self.base_url) from exc
        except Exception as exc:
            cause = exc.__cause__
            if isinstance(cause, openai.OpenAIError | TimeoutError):
                raise classify(cause, self.base_url) from exc
            llm_metrics().structured_failures.labels(
                self.model_id, self.model_version, self.kind, "final"
            ).inc()
            raise StructuredOutputFailed(
                f"the backend's output did not validate after {reasks} re-asks: "
                f"{str(exc).splitlines()[0][:300]}",
                {"component": "llm", "engine": self.kind, "backend": self.base_url},
            ) from exc
        attempts = 1 + len(parse_errors)
        value = obj.root if isinstance(obj, RootModel) else obj.model_dump(mode="json")
        text = obj.model_dump_json()
        usage = getattr(completion, "usage", None)
        total = time.monotonic() - arrived
        return StructuredResult(
            value,
            text,
            attempts,
            Finished(
                finish_reason="stop",
                prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                time_to_first_token_s=None,
                decode_s=0.0,
                total_s=total,
            ),
        )

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "engine": self.kind,
            "model": self.model_id,
            "backend": self.base_url,
            "instructor_mode": self.settings.instructor_mode,
        }
        if self._last_probe is not None:
            out["reachable"] = self._last_probe[1] is None
            if self._last_probe[1]:
                out["probe_error"] = self._last_probe[1]
        return out

    async def probe(self, max_age_s: float = 5.0) -> str | None:
        """GET {base}/models with a short timeout; cached for `max_age_s`."""
        now = time.monotonic()
        if self._last_probe is not None and now - self._last_probe[0] < max_age_s:
            return self._last_probe[1]
        error: str | None = None
        try:
            await self.client.with_options(timeout=1.0, max_retries=0).models.list()
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                error = f"backend answered {exc.status_code}"
        except openai.OpenAIError as exc:
            error = f"unreachable: {type(exc).__name__}"
        self._last_probe = (now, error)
        return error

    async def aclose(self) -> None:
        await self.client.close()
