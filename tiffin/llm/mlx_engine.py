"""The in-process engine: mlx-lm on MLX (CPU backend on Linux, Metal on Apple Silicon).

Generation runs in a small dedicated thread pool (one thread by default: MLX is fastest with one
generation at a time on a CPU, and it keeps the event loop free). Requests beyond the running ones
wait in a bounded queue; a full queue or a long wait is a 503, never a hang. Tokens are decoded
with mlx-lm's `generate_step` and sampler; structured outputs add a logits processor that applies
the constrained-decoding mask (`tiffin.llm.constrained`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tiffin.errors import InvalidInput
from tiffin.llm.constrained import CompiledSchema, Constraint, SchemaCache, SchemaError
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
from tiffin.llm.errors import LLMBusy, LLMUnavailable, StructuredOutputFailed
from tiffin.llm.metrics import llm_metrics
from tiffin.llm.settings import LLMSettings
from tiffin.llm.vocab import TokenTable

log = logging.getLogger("tiffin.llm")


def resolve_source(settings: LLMSettings) -> str:
    """The directory (or hub id) mlx-lm loads: MODEL_PATH, else the BentoML model store."""
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        if path.exists():
            return str(path)
        looks_local = settings.model_path.startswith(("/", ".", "~")) or (
            settings.model_path.count("/") != 1
        )
        if looks_local:  # never send a missing local path to the hub as if it were a repo id
            raise LLMUnavailable(f"model directory {settings.model_path!r} does not exist")
        return settings.model_path  # a hub id (org/name), downloaded when the hub is reachable
    import bentoml

    tag = settings.model_name if ":" in settings.model_name else f"{settings.model_name}:latest"
    try:
        return str(bentoml.models.get(tag).path)
    except (bentoml.exceptions.NotFound, ValueError) as exc:
        raise LLMUnavailable(
            f"model {tag!r} is not in the BentoML model store; build the default with "
            "`python -m models.tiny_llm` or set TIFFIN_LLM_MODEL_PATH / MODEL_PATH"
        ) from exc


class _StopMatcher:
    """Cuts the text at the first stop string, holding back what could be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Workers:
    """Daemon threads that run generations. Not a ThreadPoolExecutor on purpose: a thread that
    has used MLX must never exit while the process lives (MLX's per-thread stream state aborts
    the process with `terminate called without an active exception` when such a thread ends),
    so these threads run until the process does."""

    def __init__(self, count: int, name: str) -> None:
        self.count = count
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._started = False
        self.closed = False

    def start(self, init: Callable[[], None] | None = None) -> None:
        """Start the threads; each runs `init` first (MLX's first use in a thread is slow)."""
        if self._started:
            return
        self._started = True
        ready = [threading.Event() for _ in range(self.count)]
        for i, event in enumerate(ready):
            threading.Thread(
                target=self._loop, args=(init, event), name=f"{self.name}-{i}", daemon=True
            ).start()
        for event in ready:
            event.wait(120)

    def _loop(self, init: Callable[[], None] | None, ready: threading.Event) -> None:
        try:
            if init is not None:
                init()
        except Exception:
            log.exception("mlx worker warm-up failed")
        finally:
            ready.set()
        while True:
            fn, args = self._queue.get()
            try:
                fn(*args)
            except Exception:  # fn reports its own errors; never let the thread die
                log.exception("mlx worker task failed")

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self.closed:
            raise RuntimeError("workers are closed")
        self.start()
        self._queue.put((fn, args))


class _Job:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        prompt_ids: list[int],
        params: GenerationParams,
        compiled: CompiledSchema | None,
        arrived: float,
        deadline: float,
    ) -> None:
        self.loop = loop
        self.prompt_ids = prompt_ids
        self.params = params
        self.compiled = compiled
        self.arrived = arrived
        self.deadline = deadline
        self.queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: Event | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled.set()


class MLXEngine(Engine):
    kind = "mlx"

    def __init__(self, settings: LLMSettings, source: str, model_id: str | None = None) -> None:
        self.settings = settings
        self.source = source
        self.model_id = model_id or settings.model_name.split(":")[0]
        self.model: Any = None
        self.tokenizer: Any = None
        self.table: TokenTable | None = None
        self.schemas: SchemaCache | None = None
        self.config: dict[str, Any] = {}
        self.device = "unknown"
        self.load_seconds: float | None = None
        self._workers = _Workers(settings.max_concurrency, "tiffin-mlx")
        atexit.register(self._drain)
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0

    # --- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and tokenizer (synchronous; a few ms for the tiny model)."""
        started = time.perf_counter()
        import mlx.core as mx
        from mlx_lm import load as mlx_load

        loaded: Any = mlx_load(self.source, return_config=True)
        model, tokenizer, config = loaded
        self.model, self.tokenizer, self.config = model, tokenizer, dict(config)
        self.table = TokenTable.from_tokenizer(tokenizer, set(tokenizer.eos_token_ids))
        self.schemas = SchemaCache(
            self.table, self.settings.decoding_limits(), self.settings.schema_cache_size
        )
        self.device = str(mx.default_device())
        self.load_seconds = time.perf_counter() - started
        log.info(
            "mlx engine loaded %s from %s on %s in %.2fs",
            self.model_id,
            self.source,
            self.device,
            self.load_seconds,
        )

    def warmup(self) -> None:
        """One short generation, so the first request does not pay for MLX's lazy set-up."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        ids = self._encode(Prompt(text="warm up"))
        for _ in zip(
            range(2), generate_step(mx.array(ids), self.model, max_tokens=2), strict=False
        ):
            pass

    def start_workers(self, warm: bool = True) -> None:
        """Start the generation threads now (each warmed up) instead of on the first request."""
        self._workers.start(self.warmup if warm and self.loaded else None)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def context_window(self) -> int | None:
        if self.settings.context_window:
            return self.settings.context_window
        value = self.config.get("max_position_embeddings")
        return int(value) if value else None

    # --- prompts ----------------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        tok = self.tokenizer
        if prompt.text is not None:
            return list(tok.encode(prompt.text))
        messages = [dict(m) for m in prompt.messages or ()]
        if getattr(tok, "has_chat_template", False):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(tok.encode(text, add_special_tokens=False))

    def prompt_tokens(self, prompt: Prompt) -> int | None:
        return len(self._encode(prompt)) if self.loaded else None

    def compile(self, target: StructuredTarget) -> CompiledSchema:
        """Compile (or fetch from the cache) the target's schema; SchemaError is a client error."""
        if self.schemas is None:
            raise LLMUnavailable("the mlx engine has no model loaded")
        return self.schemas.get(target.schema)

    def min_tokens(self, target: StructuredTarget) -> int | None:
        return self.compile(target).min_tokens

    # --- generation -------------------------------------------------------------------------

    def _admit(self) -> None:
        with self._lock:
            capacity = self.settings.max_concurrency + self.settings.max_queue
            if self._waiting + self._running >= capacity:
                raise LLMBusy(
                    "the LLM queue is full",
                    {
                        "component": "llm",
                        "queue_depth": self._waiting,
                        "running": self._running,
                        "retry_after_s": 1.0,
                    },
                )
            self._waiting += 1
            self._publish()

    def _publish(self) -> None:
        m = llm_metrics()
        m.queue_depth.labels(self.model_id).set(self._waiting)
        m.in_flight.labels(self.model_id).set(self._running)

    async def stream(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget | None = None
    ) -> AsyncIterator[Event]:
        if not self.loaded:
            raise LLMUnavailable("the mlx engine has no model loaded")
        arrived = time.monotonic()
        prompt_ids = self._encode(prompt)
        window = self.context_window
        if window and len(prompt_ids) + params.max_tokens > window:
            raise InvalidInput(
                f"prompt: {len(prompt_ids)} tokens + max_tokens {params.max_tokens} exceed the "
                f"model's context window of {window} tokens"
            )
        compiled = None
        if target is not None:
            try:
                compiled = await asyncio.to_thread(self.compile, target)
            except SchemaError as exc:
                raise InvalidInput(f"json_schema: {exc}") from exc
            if compiled.min_tokens > params.max_tokens:
                raise InvalidInput(
                    f"max_tokens: {params.max_tokens} is too small for this schema; "
                    f"a valid output needs at least {compiled.min_tokens} tokens"
                )
        deadline = arrived + self.settings.request_timeout_s
        job = _Job(asyncio.get_running_loop(), prompt_ids, params, compiled, arrived, deadline)
        self._admit()
        try:
            self._workers.submit(self._run, job)
        except RuntimeError as exc:  # executor shut down
            with self._lock:
                self._waiting -= 1
                self._publish()
            raise LLMUnavailable("the mlx engine is shutting down") from exc
        try:
            while True:
                timeout = max(0.5, job.deadline - time.monotonic() + 5.0)
                try:
                    item = await asyncio.wait_for(job.queue.get(), timeout)
                except TimeoutError as exc:
                    raise BackendFailure(
                        "the mlx engine did not answer within the request deadline",
                        {"component": "llm", "timeout_s": self.settings.request_timeout_s},
                    ) from exc
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            job.cancelled.set()

    def _run(self, job: _Job) -> None:
        """Worker thread: one whole generation, events sent back to the job's event loop."""
        with self._lock:
            self._waiting -= 1
            self._running += 1
            self._publish()
        started = time.monotonic()
        try:
            if job.cancelled.is_set():
                return
            waited = started - job.arrived
            if waited > self.settings.queue_timeout_s:
                job.emit(
                    LLMBusy(
                        f"waited {waited:.1f}s in the LLM queue (limit "
                        f"{self.settings.queue_timeout_s:.0f}s)",
                        {"component": "llm", "retry_after_s": 1.0},
                    )
                )
                return
            finished = self._generate(job, waited)
            # Emitted only now, with every MLX array of the generation released: a caller that
            # exits right after the last event must not find this thread inside MLX.
            if finished is not None:
                job.emit(finished)
        except Exception as exc:
            log.exception("mlx generation failed")
            job.emit(BackendFailure(f"the mlx engine failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._running -= 1
                self._publish()

    def _processor(self, constraint: Constraint, prompt_len: int) -> Callable[[Any, Any], Any]:
        import mlx.core as mx

        def apply(tokens: Any, logits: Any) -> Any:
            seen = int(tokens.size) - prompt_len
            if seen > len(constraint.tokens) + (1 if constraint.ended else 0):
                constraint.sync(tokens[prompt_len:].tolist())
            return logits + mx.array(constraint.bias(int(logits.shape[-1])))

        return apply

    def _generate(self, job: _Job, waited: float) -> Finished | None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        assert self.table is not None
        params = job.params
        constraint = (
            Constraint(job.compiled, params.max_tokens, self.table.eos_ids)
            if job.compiled is not None
            else None
        )
        if params.seed is not None:
            mx.random.seed(params.seed)
        sampler = make_sampler(temp=params.temperature, top_p=params.top_p)
        processors = [self._processor(constraint, len(job.prompt_ids))] if constraint else None
        text = self.table.decoder()
        stops = _StopMatcher(() if constraint else params.stop)
        generated: list[int] = []
        first_at: float | None = None
        last_at = time.monotonic()
        finish, cut = "length", False
        steps = generate_step(
            mx.array(job.prompt_ids),
            self.model,
            max_tokens=params.max_tokens + 1,  # room for the end-of-sequence token
            sampler=sampler,
            logits_processors=processors,
        )
        try:
            for token, _ in steps:
                now = time.monotonic()
                if job.cancelled.is_set():
                    return None
                if token in self.table.eos_ids:
                    finish = "stop"
                    break
                if len(generated) >= params.max_tokens:
                    break
                generated.append(int(token))
                last_at = now
                if first_at is None:
                    first_at = now
                if constraint is not None:
                    constraint.sync(generated)
                piece, stopped = stops.feed(text.add(int(token)))
                if piece:
                    job.emit(Delta(piece))
                if stopped:
                    finish, cut = "stop", True
                    break
                if constraint is not None and constraint.complete:
                    finish = "stop"
                    break
                if now > job.deadline:
                    log.warning("generation stopped at the request deadline")
                    break
        finally:
            steps.close()  # in this thread: the generator holds MLX stream state
        if not cut:  # what the decoder and the stop matcher still hold
            piece, stopped = stops.feed(text.flush())
            tail = piece if stopped else piece + stops.flush()
            if tail:
                job.emit(Delta(tail))
        return Finished(
            finish_reason=finish,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(generated),
            time_to_first_token_s=(first_at - job.arrived) if first_at else None,
            decode_s=(last_at - first_at) if first_at else 0.0,
            total_s=time.monotonic() - job.arrived,
            queue_s=waited,
        )

    async def structured(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget
    ) -> StructuredResult:
        last_error = ""
        attempts = self.settings.structured_attempts
        for attempt in range(1, attempts + 1):
            seed = None if params.seed is None else params.seed + attempt - 1
            attempt_params = GenerationParams(
                params.max_tokens, params.temperature, params.top_p, (), seed
            )
            parts: list[str] = []
            finished: Finished | None = None
            async for event in self.stream(prompt, attempt_params, target):
                if isinstance(event, Delta):
                    parts.append(event.text)
                else:
                    finished = event
            text = "".join(parts)
            assert finished is not None
            try:
                value = target.validate(text)
            except OutputInvalid as exc:
                last_error = str(exc)
                llm_metrics().structured_failures.labels(self.model_id, self.kind, "attempt").inc()
                log.warning("constrained output failed validation (%s): %r", exc, text[:200])
                continue
            return StructuredResult(value, text, attempt, finished)
        raise StructuredOutputFailed(
            f"no schema-valid output after {attempts} attempts: {last_error}",
            {"component": "llm", "engine": self.kind},
        )

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "engine": self.kind,
            "model": self.model_id,
            "source": self.source,
            "loaded": self.loaded,
            "device": self.device,
            "queue_depth": self._waiting,
            "running": self._running,
            "max_concurrency": self.settings.max_concurrency,
            "max_queue": self.settings.max_queue,
        }
        if self.loaded:
            out["context_window"] = self.context_window
            out["vocab_size"] = self.table.size if self.table else None
            out["load_seconds"] = round(self.load_seconds or 0.0, 3)
            path = Path(self.source)
            out["source_kind"] = "directory" if path.exists() else "hub"
        return out

    def _drain(self, timeout_s: float = 5.0) -> None:
        """At interpreter exit, wait (briefly) for running generations: MLX aborts the process
        if it is torn down while a thread is inside it."""
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            time.sleep(0.01)

    async def aclose(self) -> None:
        self._workers.closed = True


def build_mlx_engine(settings: LLMSettings) -> MLXEngine:
    """Resolve, load and warm the engine; raises LLMUnavailable naming what is missing."""
    source = resolve_source(settings)
    engine = MLXEngine(settings, source)
    try:
        engine.load()
    except ImportError as exc:
        raise LLMUnavailable(f"mlx / mlx-lm cannot be imported here: {exc}") from exc
    except Exception as exc:
        raise LLMUnavailable(
            f"cannot load model from {source!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if settings.warmup:
        from tiffin.llm.response_models import FraudExplanation

        with contextlib.suppress(Exception):
            engine.schemas and engine.schemas.get(FraudExplanation.model_json_schema())
        engine.start_workers(warm=True)
    return engine
