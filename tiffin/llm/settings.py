"""LLMSettings: everything about the LLM runner, read from `TIFFIN_LLM_*` environment variables.

Seed 002's names are accepted too (`MODEL_NAME`, `MODEL_PATH`, `OLLAMA_BASE_URL`, `MLX_ENABLED`),
so an existing deployment's environment keeps working.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tiffin.llm.constrained import DecodingLimits

EngineChoice = Literal["auto", "mlx", "remote"]
ResolvedEngine = Literal["mlx", "remote", "disabled"]


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class LLMSettings(BaseSettings):
    """The LLM runner: which engine and model, its limits, guards and failure handling."""

    model_config = SettingsConfigDict(
        env_prefix="TIFFIN_LLM_", extra="ignore", populate_by_name=True
    )

    # --- engine and model ------------------------------------------------------------------

    enabled: bool = True
    """Master switch. `false` turns every LLM endpoint into a 503 that says so, `/health` reports
    the LLM as `disabled`, and the tabular endpoints are unaffected."""

    engine: EngineChoice = "auto"
    """`mlx`: mlx-lm in-process (MLX's CPU backend on Linux, Metal on Apple Silicon). `remote`: an
    OpenAI-compatible server (Ollama, vLLM, mlx_lm.server, another Tiffin) at `remote_base_url`.
    `auto`: `mlx` when `mlx_enabled`, else `remote` when `remote_base_url` is set, else disabled."""

    mlx_enabled: bool = Field(True, validation_alias=_env("TIFFIN_LLM_MLX_ENABLED", "MLX_ENABLED"))
    """Whether the in-process MLX engine may be used (`MLX_ENABLED` in seed 002)."""

    model_name: str = Field(
        "tiffin-tiny-llm", validation_alias=_env("TIFFIN_LLM_MODEL_NAME", "MODEL_NAME")
    )
    """The model's name (`MODEL_NAME` in seed 002). For `mlx` without `model_path` it is the
    BentoML model-store tag to load (`name` or `name:version`; `python -m models.tiny_llm` builds
    the default). For `remote` it is the model id sent to the backend unless `remote_model` is
    set. It is also the id the OpenAI-compatible API lists under `/openai/v1/models`."""

    model_path: str | None = Field(
        None, validation_alias=_env("TIFFIN_LLM_MODEL_PATH", "MODEL_PATH")
    )
    """Where the `mlx` engine loads weights from instead of the model store (`MODEL_PATH` in seed
    002): a local mlx-lm/Hugging Face model directory, or a hub id (`mlx-community/...`) when the
    machine can reach the hub."""

    # --- remote OpenAI-compatible backend --------------------------------------------------

    remote_base_url: str | None = Field(
        None, validation_alias=_env("TIFFIN_LLM_REMOTE_BASE_URL", "OLLAMA_BASE_URL")
    )
    """Base URL of the OpenAI-compatible API, including `/v1` (`OLLAMA_BASE_URL` in seed 002,
    e.g. `http://localhost:11434/v1`)."""

    remote_api_key: SecretStr = SecretStr("not-needed")
    """Bearer key for the remote backend (Ollama and mlx_lm.server ignore it)."""

    remote_model: str | None = None
    """Model id at the remote backend; defaults to `model_name`."""

    remote_timeout_s: float = Field(30.0, gt=0, le=600)
    """Read timeout of one remote HTTP attempt."""

    remote_connect_timeout_s: float = Field(2.0, gt=0, le=60)
    """Connect timeout of one remote HTTP attempt; a backend that is down fails within it."""

    remote_max_retries: int = Field(1, ge=0, le=5)
    """Bounded transport retries per remote call (connection errors, 408/429/5xx), with the
    OpenAI client's exponential backoff."""

    structured_max_reasks: int = Field(2, ge=0, le=5)
    """For remote engines: how many times instructor re-asks the model with the validation error
    when its JSON does not validate."""

    instructor_mode: Literal["json_schema", "json", "tools", "md_json"] = "json_schema"
    """How instructor asks the remote backend for JSON: `json_schema` (response_format
    json_schema; Ollama >= 0.5, vLLM, Tiffin), `json` (json_object + schema in the prompt),
    `tools` (forced function call) or `md_json` (a fenced JSON block)."""

    # --- circuit breaker -------------------------------------------------------------------

    breaker_failure_threshold: int = Field(3, ge=1, le=100)
    """Consecutive backend failures (connection errors, timeouts, 5xx) that open the breaker."""

    breaker_reset_timeout_s: float = Field(30.0, gt=0, le=3600)
    """How long an open breaker fails fast before letting one trial call through (half-open)."""

    # --- concurrency and deadlines ---------------------------------------------------------

    max_concurrency: int = Field(32, ge=1, le=256)
    """Sequences the in-process engine decodes together in one continuous batch (per worker
    process); more wait in the queue. Requests join and leave the batch between decode steps.
    On a CPU, tokens/s grows with the batch until the matrix products become compute-bound
    (about 8-16 sequences for a tens-of-millions-parameter model, 64 and more for the tiny one)."""

    max_queue: int = Field(256, ge=0, le=10_000)
    """Requests that may wait (FIFO) for a place in the batch; beyond `max_concurrency +
    max_queue` requests get a 503 with Retry-After at once. The default lets far more than 64
    concurrent streams complete on two workers."""

    decode_lanes: int = Field(1, ge=1, le=16)
    """Batch threads per worker process, each decoding its own continuous batch on its own MLX
    stream (on MLX's CPU backend, its own core); newcomers go to the least busy. More than one
    can use an idle core when requests reach only one worker; on the shared benchmark box it
    did not pay (docs/benchmarks.md), so the default is one."""

    prefill_step_size: int = Field(256, ge=16, le=8192)
    """Prompt tokens of a newcomer processed between two decode steps of the running batch:
    smaller keeps inter-token latency of running streams low while long prompts arrive, larger
    gets newcomers to their first token sooner."""

    prefix_cache_size: int = Field(64, ge=0, le=4096)
    """Prompts whose KV caches each decode lane keeps (least recently used dropped first): a
    newcomer whose prompt starts with a stored prompt's tokens (a system prompt, the
    fraud-explanation template, a chat template) copies that prefix's cache and processes only
    the rest. `0` turns prefix caching off."""

    prefix_cache_max_mb: int = Field(256, ge=1, le=1 << 20)
    """Memory the stored prompt caches of one decode lane may take (MiB); least recently used
    go first. A prompt's KV cache is 2 x layers x KV heads x head size x 4 bytes a token: 8 KiB
    for the bench-size model, ~100 KiB for a 1-3B model."""

    prefix_cache_min_tokens: int = Field(8, ge=1)
    """Shortest shared prefix worth copying a cache for; shorter ones are processed afresh."""

    queue_timeout_s: float = Field(30.0, gt=0, le=600)
    """Longest wait in the queue before a request gets a 503 instead of a generation."""

    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    """Deadline of one LLM call end to end (queue + generation, or all remote attempts)."""

    cpu_column_major_weights: bool = True
    """On MLX's CPU backend, store each float32 dense layer's weight column-major at load (same
    values, same results up to summation order): the bundled reference BLAS then runs its
    vectorizable loop for `x @ W.T`, 1.3-1.4x faster matmuls (docs/benchmarks.md). No effect on
    Metal, whose kernels take either layout."""

    # --- limits ----------------------------------------------------------------------------

    default_max_tokens: int = Field(128, ge=1)
    """`max_tokens` of `/generate` and chat completions when the request does not say."""

    structured_default_max_tokens: int = Field(256, ge=1)
    """`max_tokens` of `/generate/structured` when the request does not say."""

    max_tokens_limit: int = Field(1024, ge=1)
    """Largest `max_tokens` one request may ask for; more is a 4xx."""

    max_prompt_chars: int = Field(8000, ge=1)
    """Largest prompt (all messages together) in characters; more is a 4xx."""

    max_messages: int = Field(64, ge=1)
    """Most chat messages in one request."""

    max_schema_bytes: int = Field(16_384, ge=64)
    """Largest JSON Schema accepted for structured output, serialized."""

    context_window: int | None = Field(None, ge=16)
    """Prompt tokens + max_tokens may not exceed this. Default: the model's
    `max_position_embeddings` (in-process engine only; remote backends enforce their own)."""

    # --- guards ----------------------------------------------------------------------------

    injection_policy: Literal["block", "flag", "off"] = "block"
    """What a prompt-injection rule match does: `block` answers 4xx naming the rule, `flag` lets
    the request through but counts it (metric `llm_guard_flags_total`) and logs it, `off` skips
    screening. The rules are in `tiffin/llm/guards.py` and docs/llm.md."""

    api_key: SecretStr | None = None
    """When set, `/openai/v1` and `POST /circuit-breaker/reset` require
    `Authorization: Bearer <api_key>`."""

    # --- constrained decoding --------------------------------------------------------------

    max_string_length: int = Field(40, ge=1, le=4096)
    """`maxLength` given to schema strings that set none (and have no pattern or format)."""

    max_array_items: int = Field(4, ge=1, le=256)
    """`maxItems` given to schema arrays that set none."""

    max_integer_digits: int = Field(6, ge=1, le=15)
    """Digits allowed for numbers whose schema sets no bound."""

    number_decimals: int = Field(2, ge=1, le=6)
    """Decimals written for schema `number`s (more when the bounds need it)."""

    schema_cache_size: int = Field(64, ge=1)
    """Compiled schemas kept per worker (compiling is the slow part of a new schema)."""

    structured_attempts: int = Field(2, ge=1, le=5)
    """In-process engine: generations tried before reporting that no schema-valid output could
    be produced (constrained decoding makes a second try all but unheard of)."""

    # --- product use -----------------------------------------------------------------------

    explain_timeout_ms: float = Field(2000.0, gt=0)
    """Deadline of the LLM-written fraud explanation; past it `/score/fraud` keeps the
    rule-based explanation."""

    explain_max_tokens: int = Field(160, ge=16)
    """Token budget of one fraud explanation."""

    warmup: bool = True
    """Load the model and run one short generation when the worker starts."""

    def resolved_engine(self) -> ResolvedEngine:
        if not self.enabled:
            return "disabled"
        if self.engine == "mlx":
            return "mlx" if self.mlx_enabled else "disabled"
        if self.engine == "remote":
            return "remote" if self.remote_base_url else "disabled"
        if self.mlx_enabled:
            return "mlx"
        return "remote" if self.remote_base_url else "disabled"

    def disabled_reason(self) -> str:
        if not self.enabled:
            return "disabled by TIFFIN_LLM_ENABLED=false"
        if self.engine == "mlx" and not self.mlx_enabled:
            return "engine mlx requested but MLX_ENABLED=false"
        if self.engine == "remote" and not self.remote_base_url:
            return "engine remote requested but no TIFFIN_LLM_REMOTE_BASE_URL / OLLAMA_BASE_URL"
        return "MLX_ENABLED=false and no TIFFIN_LLM_REMOTE_BASE_URL / OLLAMA_BASE_URL"

    def decoding_limits(self) -> DecodingLimits:
        return DecodingLimits(
            max_string_length=self.max_string_length,
            max_array_items=self.max_array_items,
            max_integer_digits=self.max_integer_digits,
            number_decimals=self.number_decimals,
        )


@lru_cache
def llm_settings() -> LLMSettings:
    return LLMSettings()
