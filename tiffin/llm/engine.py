"""The one interface every LLM engine implements, and the values that cross it.

An engine turns a `Prompt` (raw text or chat messages) and `GenerationParams` into a stream of
`Delta`s closed by one `Finished`, optionally constrained to a `StructuredTarget`; `structured`
returns a validated object. Engines: `tiffin.llm.mlx_engine.MLXEngine` (mlx-lm in-process) and
`tiffin.llm.remote.RemoteEngine` (any OpenAI-compatible server, instructor for structured calls).
Policy (guards, breaker, metrics, sanitization) lives above them in `tiffin.llm.runtime.LLM`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from tiffin.llm.errors import LLMUnavailable

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    """Exactly one of `text` (raw completion) or `messages` (chat, template applied)."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a prompt is either text or messages")

    def contents(self) -> list[tuple[str, str]]:
        if self.text is not None:
            return [("prompt", self.text)]
        return [(f"messages[{i}].content", m["content"]) for i, m in enumerate(self.messages or ())]

    def chars(self) -> int:
        return sum(len(text) for _, text in self.contents())


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    decode_s: float  # first token → last token
    total_s: float
    queue_s: float = 0.0

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token (the first one carries the prompt's cost)."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.completion_tokens - 1) / self.decode_s


Event = Delta | Finished


class OutputInvalid(ValueError):
    """The output text does not validate against the target; the message says why."""


@dataclass
class StructuredTarget:
    """What a structured output must validate against: a JSON Schema, maybe a pydantic model."""

    name: str
    schema: dict[str, Any]
    model: type[BaseModel] | None = None
    _validator: Any = field(default=None, repr=False)

    @classmethod
    def from_model(cls, name: str, model: type[BaseModel]) -> StructuredTarget:
        return cls(name, model.model_json_schema(), model)

    def validate(self, text: str) -> Any:
        """The parsed JSON value if `text` validates; OutputInvalid otherwise."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OutputInvalid(f"output is not JSON: {exc.msg} at position {exc.pos}") from exc
        self.validate_value(value)
        return value

    def validate_value(self, value: Any) -> None:
        if self.model is not None:
            try:
                self.model.model_validate(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "(root)"
                raise OutputInvalid(f"{where}: {first['msg']}") from exc
            return
        if self._validator is None:
            from jsonschema import Draft202012Validator

            self._validator = Draft202012Validator(self.schema)
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            raise OutputInvalid(f"{where}: {error.message}")


@dataclass
class StructuredResult:
    value: Any
    text: str
    attempts: int
    finished: Finished


class BackendFailure(LLMUnavailable):
    """The backend failed (connection, timeout, 5xx, engine crash): counts against the breaker."""


class Engine(ABC):
    kind: ClassVar[str]
    model_id: str
    model_version: str
    """The served weights' version (the model store tag's), labelling every LLM metric."""

    @abstractmethod
    def stream(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget | None = None
    ) -> AsyncIterator[Event]:
        """Deltas then one Finished. Raises InvalidInput, LLMUnavailable or BackendFailure."""

    @abstractmethod
    async def structured(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget
    ) -> StructuredResult:
        """A value that validates against `target`, or StructuredOutputFailed."""

    def prompt_tokens(self, prompt: Prompt) -> int | None:
        """Prompt length in tokens when the engine can tell before calling the model."""
        return None

    @property
    def context_window(self) -> int | None:
        return None

    def min_tokens(self, target: StructuredTarget) -> int | None:
        """Fewest tokens a valid output needs, when the engine can tell (constrained decoding)."""
        return None

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Engine facts for /health and the breaker status (never raises)."""

    async def probe(self) -> str | None:
        """None when the engine can serve, else why not (may contact the backend briefly)."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, HTTP connections)."""
