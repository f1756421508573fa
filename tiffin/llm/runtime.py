"""`LLM`: the engine plus everything around it — input checks, guards, breaker, metrics, health.

Every entry point (`/generate`, `/generate/structured`, the OpenAI-compatible API, the fraud
explanation) goes through one `LLM` object per worker process, so the rules are the same
everywhere: bad input is a 422 naming the field, a down or failing backend is a 503 that carries
the breaker state and never a hang, outputs are sanitized, metrics are recorded by model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tiffin.errors import InvalidInput
from tiffin.llm import guards
from tiffin.llm.breaker import STATE_VALUE, CircuitBreaker
from tiffin.llm.constrained import SchemaError, check_schema
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
from tiffin.llm.errors import LLMError, LLMUnavailable, StructuredOutputFailed
from tiffin.llm.metrics import llm_metrics
from tiffin.llm.response_models import RESPONSE_MODELS
from tiffin.llm.settings import LLMSettings, llm_settings

log = logging.getLogger("tiffin.llm")

ROLES = ("system", "developer", "user", "assistant", "tool")


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[Event]) -> AsyncIterator[AsyncIterator[Event]]:
    """`contextlib.aclosing` for an engine's event stream (an async generator typed as an
    iterator): closed on exit, so the engine frees the request's place at once."""
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


MAX_STOP_SEQUENCES = 4
# MLX seeds its PRNG with an unsigned 64-bit integer (`mx.random.seed` raises TypeError outside
# [0, 2**64 - 1], inside the engine, where it counted against the circuit breaker), structured
# retries use `seed + attempt`, and OpenAI-compatible backends take a signed 64-bit seed.
SEED_RANGE = (0, 2**63 - 1)


class LLM:
    def __init__(
        self,
        settings: LLMSettings,
        engine: Engine | None,
        unavailable_reason: str | None = None,
        disabled: bool = False,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.unavailable_reason = unavailable_reason
        self.disabled = disabled
        backend = engine.kind if engine is not None else settings.resolved_engine()
        if engine is not None and getattr(engine, "base_url", None):
            backend = f"remote:{engine.base_url}"  # type: ignore[attr-defined]
        self.backend = backend
        self.breaker = CircuitBreaker(
            backend, settings.breaker_failure_threshold, settings.breaker_reset_timeout_s
        )
        # Create the metrics now (in the worker, where the multiprocess directory is set):
        # creating them lazily cost the first request about a second. Touching the label sets
        # exports them at 0, so a dashboard sees "no failures" rather than "no data".
        self._publish_breaker()
        m = llm_metrics()
        for stage in ("attempt", "final"):
            m.structured_failures.labels(self.model_id, self.model_version, self.engine_kind, stage)
        for kind in ("prompt", "completion"):
            m.tokens.labels(self.model_id, self.model_version, self.engine_kind, kind)

    @classmethod
    def from_settings(cls, settings: LLMSettings | None = None) -> LLM:
        """Build the configured engine. Never raises: a missing model or an unusable
        configuration gives an LLM whose endpoints answer 503 and whose health says why."""
        settings = settings or llm_settings()
        kind = settings.resolved_engine()
        if kind == "disabled":
            return cls(settings, None, settings.disabled_reason(), disabled=True)
        try:
            if kind == "mlx":
                from tiffin.llm.mlx_engine import build_mlx_engine

                engine: Engine = build_mlx_engine(settings)
            else:
                from tiffin.llm.remote import RemoteEngine

                engine = RemoteEngine(settings)
        except LLMUnavailable as exc:
            log.warning("LLM unavailable: %s", exc.message)
            return cls(settings, None, exc.message)
        return cls(settings, engine)

    # --- identity ---------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        if self.engine is not None:
            return self.engine.model_id
        return self.settings.remote_model or self.settings.model_name.split(":")[0]

    @property
    def model_version(self) -> str:
        return self.engine.model_version if self.engine is not None else "none"

    @property
    def engine_kind(self) -> str:
        return self.engine.kind if self.engine is not None else "none"

    # --- request checks ---------------------------------------------------------------------

    def prompt_from_text(self, text: Any, field: str = "prompt") -> Prompt:
        if not isinstance(text, str):
            raise InvalidInput(f"{field}: must be a string")
        guards.check_text(field, text, self.settings.max_prompt_chars)
        return Prompt(text=text)

    def prompt_from_messages(self, messages: Any, field: str = "messages") -> Prompt:
        if not isinstance(messages, list) or not messages:
            raise InvalidInput(f"{field}: must be a non-empty list of messages")
        if len(messages) > self.settings.max_messages:
            raise InvalidInput(
                f"{field}: {len(messages)} messages is over the limit of "
                f"{self.settings.max_messages}"
            )
        out = []
        for i, message in enumerate(messages):
            where = f"{field}[{i}]"
            if not isinstance(message, dict):
                raise InvalidInput(f"{where}: must be an object with role and content")
            role = message.get("role")
            if role not in ROLES:
                raise InvalidInput(f"{where}.role: must be one of {', '.join(ROLES)}")
            content = message.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                texts = [
                    part.get("text", "")
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text"
                ]
                if len(texts) != len(content):
                    raise InvalidInput(f"{where}.content: only text parts are supported")
                content = "\n".join(texts)
            if content is None and role == "assistant":
                content = ""
            if not isinstance(content, str):
                raise InvalidInput(f"{where}.content: must be a string")
            out.append({"role": "system" if role == "developer" else role, "content": content})
        if not any(m["content"].strip() for m in out if m["role"] != "assistant"):
            raise InvalidInput(f"{field}: the prompt must not be empty")
        total = sum(len(m["content"]) for m in out)
        if total > self.settings.max_prompt_chars:
            raise InvalidInput(
                f"{field}: {total} characters is over the limit of "
                f"{self.settings.max_prompt_chars} (TIFFIN_LLM_MAX_PROMPT_CHARS)"
            )
        return Prompt(messages=tuple(out))

    def params(
        self,
        max_tokens: Any = None,
        temperature: Any = 0.7,
        top_p: Any = 1.0,
        stop: Any = None,
        seed: Any = None,
        structured: bool = False,
        field: str = "max_tokens",
    ) -> GenerationParams:
        default = (
            self.settings.structured_default_max_tokens
            if structured
            else self.settings.default_max_tokens
        )
        tokens = guards.check_max_tokens(field, max_tokens, default, self.settings.max_tokens_limit)
        temperature = 0.7 if temperature is None else temperature
        top_p = 1.0 if top_p is None else top_p
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise InvalidInput("temperature: must be a number")
        if not 0 <= temperature <= 2:
            raise InvalidInput(f"temperature: {temperature} is out of range [0, 2]")
        if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
            raise InvalidInput(f"top_p: {top_p} is out of range (0, 1]")
        stops: tuple[str, ...] = ()
        if stop is not None:
            stop_list = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop_list, list) or not all(isinstance(s, str) for s in stop_list):
                raise InvalidInput("stop: must be a string or a list of strings")
            if len(stop_list) > MAX_STOP_SEQUENCES or any(len(s) > 64 for s in stop_list):
                raise InvalidInput(
                    f"stop: at most {MAX_STOP_SEQUENCES} sequences of at most 64 characters"
                )
            stops = tuple(s for s in stop_list if s)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidInput("seed: must be an integer")
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise InvalidInput(f"seed: {seed} is out of range [0, 2**63 - 1]")
        return GenerationParams(tokens, float(temperature), float(top_p), stops, seed)

    def target(
        self,
        json_schema: Any = None,
        response_model: Any = None,
        name: str | None = None,
        schema_field: str = "json_schema",
    ) -> StructuredTarget:
        """The structured-output target from a raw JSON Schema or a named response model."""
        if (json_schema is None) == (response_model is None):
            raise InvalidInput(f"{schema_field}, response_model: give exactly one of the two")
        if response_model is not None:
            model = RESPONSE_MODELS.get(response_model) if isinstance(response_model, str) else None
            if model is None:
                known = ", ".join(sorted(RESPONSE_MODELS))
                raise InvalidInput(
                    f"response_model: unknown response model {response_model!r}; known: {known}"
                )
            return StructuredTarget.from_model(str(response_model), model)
        size = len(json.dumps(json_schema))
        if size > self.settings.max_schema_bytes:
            raise InvalidInput(
                f"{schema_field}: {size} bytes is over the limit of "
                f"{self.settings.max_schema_bytes} (TIFFIN_LLM_MAX_SCHEMA_BYTES)"
            )
        try:
            check_schema(json_schema)
        except SchemaError as exc:
            raise InvalidInput(f"{schema_field}: {exc}") from exc
        title = json_schema.get("title") if isinstance(json_schema, dict) else None
        return StructuredTarget(
            name or (title if isinstance(title, str) else "response"), json_schema
        )

    def screen(self, prompt: Prompt) -> None:
        """Prompt-injection screening per `injection_policy` (block → 422 naming the rule)."""
        policy = self.settings.injection_policy
        if policy == "off":
            return
        findings = guards.screen(prompt.contents())
        if not findings:
            return
        events = llm_metrics().guard_events
        action = "blocked" if policy == "block" else "flagged"
        for finding in findings:
            events.labels(finding.rule, action).inc()
        first = findings[0]
        log.warning(
            "prompt-injection rule %s matched in %s (%s): %r",
            first.rule,
            first.where,
            action,
            first.excerpt,
        )
        if policy == "block":
            raise InvalidInput(
                f"{first.where}: rejected by prompt-injection rule {first.rule!r} "
                f"(matched {first.excerpt!r}); see docs/llm.md"
            )

    # --- calls ------------------------------------------------------------------------------

    def _require(self) -> Engine:
        if self.engine is None:
            status = "disabled" if self.disabled else "down"
            raise LLMUnavailable(
                f"the LLM is {status}: {self.unavailable_reason}",
                {"component": "llm", "status": status, "engine": self.settings.resolved_engine()},
            )
        return self.engine

    def _breaker_open(self) -> LLMUnavailable:
        status = self.breaker.status()
        self._publish_breaker()
        return LLMUnavailable(
            f"the LLM backend ({self.backend}) is failing; the circuit breaker is open "
            f"and retries in {status['retry_after_s']:.1f}s",
            {"component": "llm", "breaker": status, "retry_after_s": status["retry_after_s"]},
        )

    def _admit(self) -> None:
        if not self.breaker.allow():
            raise self._breaker_open()

    def _failed(self, exc: BackendFailure) -> LLMUnavailable:
        self.breaker.record_failure(exc.message)
        self._publish_breaker()
        status = self.breaker.status()
        return LLMUnavailable(
            exc.message,
            {**exc.detail, "breaker": status, "retry_after_s": status["retry_after_s"] or None},
        )

    def _publish_breaker(self) -> None:
        llm_metrics().breaker_state.labels(self.backend).set(STATE_VALUE[self.breaker.state])

    def _observe(self, finished: Finished, endpoint: str) -> None:
        m = llm_metrics()
        model, version, engine = self.model_id, self.model_version, self.engine_kind
        if finished.prompt_tokens:
            m.tokens.labels(model, version, engine, "prompt").inc(finished.prompt_tokens)
        if finished.completion_tokens:
            m.tokens.labels(model, version, engine, "completion").inc(finished.completion_tokens)
        if finished.time_to_first_token_s is not None:
            m.time_to_first_token.labels(model, version, engine).observe(
                finished.time_to_first_token_s
            )
        tps = finished.tokens_per_second
        if tps is not None:
            m.tokens_per_second.labels(model, version, engine).observe(tps)

    def _count(self, endpoint: str, status: str, started: float) -> None:
        m = llm_metrics()
        m.requests.labels(
            self.model_id, self.model_version, self.engine_kind, endpoint, status
        ).inc()
        m.duration.labels(self.model_id, self.model_version, self.engine_kind, endpoint).observe(
            time.monotonic() - started
        )

    @staticmethod
    def _status_of(exc: BaseException) -> str:
        if isinstance(exc, InvalidInput):
            return "client_error"
        if isinstance(exc, LLMUnavailable):
            return "unavailable"
        if isinstance(exc, StructuredOutputFailed):
            return "invalid_output"
        return "error"

    async def check(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget | None = None
    ) -> Engine:
        """Everything that can be refused before the engine runs (called by `stream` and
        `structured`; exposed so a streaming endpoint can fail with a 4xx before it starts)."""
        engine = self._require()
        if self.breaker.state == "open":  # fail before a stream starts; a trial is taken later
            raise self._breaker_open()
        self.screen(prompt)
        window = engine.context_window
        if window:
            used = engine.prompt_tokens(prompt)
            if used is not None and used + params.max_tokens > window:
                raise InvalidInput(
                    f"prompt: {used} tokens + max_tokens {params.max_tokens} exceed the model's "
                    f"context window of {window} tokens"
                )
        if target is not None:
            try:  # compiling a new schema takes a moment: not on the event loop
                needed = await asyncio.to_thread(engine.min_tokens, target)
            except SchemaError as exc:
                raise InvalidInput(f"json_schema: {exc}") from exc
            if needed is not None and needed > params.max_tokens:
                raise InvalidInput(
                    f"max_tokens: {params.max_tokens} is too small for this schema; a valid "
                    f"output needs at least {needed} tokens"
                )
        return engine

    async def stream(
        self,
        prompt: Prompt,
        params: GenerationParams,
        target: StructuredTarget | None = None,
        endpoint: str = "generate",
        checked: bool = False,
    ) -> AsyncIterator[Event]:
        """Sanitized deltas then one Finished. Structured streams are validated at the end.
        `checked`: the caller already ran `check` (to answer 4xx/503 before streaming)."""
        started = time.monotonic()
        status = "error"
        admitted = False
        try:
            engine = self._require() if checked else await self.check(prompt, params, target)
            self._admit()
            admitted = True
            parts: list[str] = []
            # When this stream is closed (client gone), the engine's stream must be closed now,
            # not when it is garbage-collected, so that its place is freed at once.
            async with _closing(engine.stream(prompt, params, target)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        if target is None:
                            text, removed = guards.sanitize(event.text)
                            for what in removed:
                                llm_metrics().guard_events.labels(what, "sanitized").inc()
                            event = Delta(text)
                        else:
                            parts.append(event.text)
                        if event.text:
                            yield event
                        continue
                    self.breaker.record_success()
                    self._publish_breaker()
                    self._observe(event, endpoint)
                    if target is not None:
                        try:
                            target.validate("".join(parts))
                        except OutputInvalid as exc:
                            llm_metrics().structured_failures.labels(
                                self.model_id, self.model_version, self.engine_kind, "final"
                            ).inc()
                            log.error("streamed structured output did not validate: %s", exc)
                            status = "invalid_output"
                            yield event
                            return
                    status = "ok"
                    yield event
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away mid-stream
            if status != "ok":
                status = "cancelled"
            raise
        except BackendFailure as exc:
            status = "unavailable"
            raise self._failed(exc) from exc
        except (InvalidInput, LLMError) as exc:
            status = self._status_of(exc)
            raise
        finally:
            if admitted and status != "ok":
                self.breaker.release_trial()
            self._count(endpoint, status, started)

    async def generate(
        self, prompt: Prompt, params: GenerationParams, endpoint: str = "generate"
    ) -> tuple[str, Finished]:
        parts = []
        finished: Finished | None = None
        async for event in self.stream(prompt, params, None, endpoint):
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                finished = event
        assert finished is not None
        return "".join(parts), finished

    async def structured(
        self,
        prompt: Prompt,
        params: GenerationParams,
        target: StructuredTarget,
        endpoint: str = "generate_structured",
    ) -> StructuredResult:
        started = time.monotonic()
        status = "error"
        admitted = False
        try:
            engine = await self.check(prompt, params, target)
            self._admit()
            admitted = True
            result = await engine.structured(prompt, params, target)
            self.breaker.record_success()
            self._publish_breaker()
            self._observe(result.finished, endpoint)
            value, removed = guards.sanitize_value(result.value)
            if removed:
                try:
                    target.validate_value(value)
                except OutputInvalid:
                    log.warning("sanitizing would invalidate the output; kept it as generated")
                else:
                    for what in removed:
                        llm_metrics().guard_events.labels(what, "sanitized").inc()
                    result.value = value
                    result.text = json.dumps(value, ensure_ascii=False)
            status = "ok"
            return result
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except BackendFailure as exc:
            status = "unavailable"
            raise self._failed(exc) from exc
        except (InvalidInput, LLMError) as exc:
            status = self._status_of(exc)
            if isinstance(exc, StructuredOutputFailed):
                llm_metrics().structured_failures.labels(
                    self.model_id, self.model_version, self.engine_kind, "final"
                ).inc()
            raise
        finally:
            if admitted and status != "ok":
                self.breaker.release_trial()
            self._count(endpoint, status, started)

    # --- operations -------------------------------------------------------------------------

    def breaker_status(self) -> dict[str, Any]:
        self._publish_breaker()
        return {
            "component": "llm",
            "engine": self.engine_kind,
            "model": self.model_id,
            **self.breaker.status(),
        }

    def reset_breaker(self) -> dict[str, Any]:
        self.breaker.reset()
        log.info("LLM circuit breaker reset")
        return self.breaker_status()

    async def health(self) -> dict[str, Any]:
        """The LLM's component entry for /health: status ok | degraded | down | disabled."""
        if self.engine is None:
            return {
                "status": "disabled" if self.disabled else "down",
                "reason": self.unavailable_reason,
                "engine": self.settings.resolved_engine(),
                "model": self.model_id,
            }
        breaker = self.breaker.status()
        try:
            problem = await asyncio.wait_for(self.engine.probe(), 2.0)
        except TimeoutError:
            problem = "health probe timed out"
        if breaker["state"] == "open":
            status, reason = "down", f"circuit breaker open: {breaker['last_error']}"
        elif problem:
            status, reason = "down", problem
        elif breaker["state"] == "half_open":
            status, reason = "degraded", "circuit breaker half-open (trial call pending)"
        else:
            status, reason = "ok", None
        out: dict[str, Any] = {
            "status": status,
            **self.engine.status(),
            "breaker": {k: breaker[k] for k in ("state", "consecutive_failures", "retry_after_s")},
        }
        if reason:
            out["reason"] = reason
        return out

    async def aclose(self) -> None:
        if self.engine is not None:
            await self.engine.aclose()


def schema_names() -> Sequence[str]:
    return sorted(RESPONSE_MODELS)
