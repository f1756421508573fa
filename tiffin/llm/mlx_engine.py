"""The in-process engine: mlx-lm on MLX (CPU backend on Linux, Metal on Apple Silicon).

Continuous batching. A batch thread owns an mlx-lm `BatchGenerator` and decodes its requests
together in one batch (`decode_lanes` such threads per worker, default 1, each on its own MLX
stream; newcomers go to the least busy lane). A newcomer joins between two decode
steps (its prompt is processed in chunks of `prefill_step_size` tokens, interleaved with decode
steps of the running sequences, so a long prompt does not stall them), and a sequence leaves the
moment it finishes, is cancelled or fails. Each sequence keeps its own sampler (temperature,
top-p, seed), stop strings, token budget and, for structured requests, its own
constrained-decoding walk whose logit mask is applied to its row only (`tiffin.llm.constrained`).

Prefix caching: each lane keeps the KV caches of recent prompts (mlx-lm's `LRUPromptCache`); a
newcomer whose prompt starts like a stored one (a system prompt, a template) copies that prefix's
cache and prefills only the rest, and a burst sharing a prefix nothing covers yet gets it
processed once. On MLX's CPU backend the float32 weights are stored column-major at load
(`column_major_weights`): the same model, matrix products 1.4x faster there.

Admission: up to `max_concurrency` sequences decode together; up to `max_queue` more wait in a
FIFO queue; beyond that a request gets a 503 with Retry-After at once. A request that waits past
its queue deadline gets a 503; one whose client goes away leaves the queue (or the batch, at the
next step) at once.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import time
from collections import deque
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
from tiffin.llm.vocab import IncrementalText, TokenTable

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


def source_version(settings: LLMSettings, source: str) -> str:
    """The version that labels the engine's metrics: the store tag's version for a model from
    the BentoML store (its directory is `<store>/models/<name>/<version>`), else `local` for a
    directory of one's own and `hub` for a hub id."""
    if settings.model_path:
        return "local" if Path(source).exists() else "hub"
    return Path(source).name


def column_major_weights(model: Any) -> int:
    """Store every dense projection's weight column-major (its transpose, row-contiguous, seen
    through a transposed view): same shape, same values, returns how many were changed.

    Why: a layer computes `x @ W.T`. With `W` row-major that is a "transposed B" GEMM, which
    MLX's CPU backend hands to its bundled reference BLAS, whose loop for that case is a dot
    product per output (a serial chain of additions). With `W` stored column-major, `W.T` is
    row-contiguous, the GEMM is "no transpose", and the reference BLAS runs its axpy loop over
    contiguous output columns (independent additions): 1.4x faster matmuls at the bench-size
    model's shapes, 1.3x fewer CPU-seconds per token (docs/benchmarks.md). Embeddings too: a
    tied embedding is the output projection (`as_linear`), and a gather from column-major rows
    costs nothing measurable. Quantized layers keep their own kernels and are left alone."""
    import mlx.core as mx
    import mlx.nn as nn

    changed = 0
    for _, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Embedding) and module.weight.dtype == mx.float32:
            module.weight = mx.contiguous(module.weight.T).T
            changed += 1
    mx.eval(model.parameters())
    return changed


def _compact(cache: list[Any]) -> list[Any]:
    """The cache holding only its tokens: a trimmed or freshly grown `KVCache` keeps buffers
    longer than its content (the generated tokens, growth in steps of 256), which a stored entry
    would pin and the prefix cache's byte budget would count."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    for layer in cache:
        if type(layer) is KVCache and layer.keys is not None:
            keys, values = layer.keys_and_values()
            layer.keys, layer.values = mx.contiguous(keys), mx.contiguous(values)
            mx.eval(layer.keys, layer.values)
    return cache


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


class _Seq:
    """One request: what its event loop waits on and, in the batch thread, its decoding state.

    `state` moves waiting → running (→ leaving, when its caller went away) → done under the
    engine's lock; everything below `uid` is
    touched only by the batch thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        prompt_ids: list[int],
        params: GenerationParams,
        compiled: CompiledSchema | None,
        arrived: float,
        settings: LLMSettings,
    ) -> None:
        self.loop = loop
        self.prompt_ids = prompt_ids
        self.params = params
        self.compiled = compiled
        self.arrived = arrived
        self.deadline = arrived + settings.request_timeout_s
        self.queue_deadline = arrived + min(settings.queue_timeout_s, settings.request_timeout_s)
        self.queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = "waiting"
        self.uid: int | None = None
        self.admitted_at = arrived
        self.constraint: Constraint | None = None
        self.text: IncrementalText | None = None
        self.stops = _StopMatcher(() if compiled is not None else params.stop)
        self.generated: list[int] = []
        self.first_at: float | None = None
        self.last_at = arrived
        self.failure: BaseException | None = None  # set by its logits processor, never raised
        self.completed = False  # ended normally (its caller may already be gone: it got it all)

    def emit(self, item: Event | BaseException) -> None:
        pending: list[tuple[_Seq, Event | BaseException]] | None = getattr(_outbox, "items", None)
        if pending is not None:  # inside a batch step: sent with the step's other events
            pending.append((self, item))
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled.set()


# The events of one decode step, per batch thread: delivered with one wake-up of each event loop
# per step instead of one per token (a wake-up per token per stream measurably slowed the step).
_outbox = threading.local()


def _deliver(
    items: list[tuple[asyncio.Queue[Event | BaseException], Event | BaseException]],
) -> None:
    for target, item in items:
        target.put_nowait(item)


def _flush(pending: list[tuple[_Seq, Event | BaseException]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for seq, item in pending:
        by_loop.setdefault(seq.loop, []).append((seq.queue, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # that loop is gone: nobody is listening any more
            for seq, _ in pending:
                if seq.loop is loop:
                    seq.cancelled.set()


class _Lane:
    """One batch thread with its own BatchGenerator and MLX stream. `size` (sequences in its
    batch) is read by the other lanes under the engine's lock to balance newcomers."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.steps = 0
        self.peak = 0
        self.idle = threading.Event()
        self.ready = threading.Event()
        # KV caches of recent prompts (mlx-lm's LRUPromptCache, a token trie), touched only by
        # this lane's thread: a newcomer whose prompt starts like an earlier one gets a copy of
        # that prefix's cache and processes only the rest (`prefix_cache_size`).
        self.prefixes: Any = None
        self.prefix_hits = 0
        self.prefix_tokens = 0
        self.primed = 0  # shared prefixes of a burst processed once and stored


class MLXEngine(Engine):
    kind = "mlx"

    def __init__(self, settings: LLMSettings, source: str, model_id: str | None = None) -> None:
        self.settings = settings
        self.source = source
        self.model_id = model_id or settings.model_name.split(":")[0]
        self.model_version = source_version(settings, source)
        self.model: Any = None
        self.tokenizer: Any = None
        self.table: TokenTable | None = None
        self.schemas: SchemaCache | None = None
        self.config: dict[str, Any] = {}
        self.device = "unknown"
        self.load_seconds: float | None = None
        atexit.register(self._drain)
        # One condition guards the queue and the counters; the batch thread sleeps on it when
        # there is nothing to do and is woken by each newcomer.
        self._cond = threading.Condition()
        self._queue: deque[_Seq] = deque()
        self._running = 0
        self._lanes: list[_Lane] = []
        self._closed = False
        self._samplers: dict[tuple[float, float], Callable[[Any], Any]] = {}

    # --- loading ----------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and tokenizer (synchronous; a few ms for the tiny model)."""
        started = time.perf_counter()
        import mlx.core as mx
        from mlx_lm import load as mlx_load

        loaded: Any = mlx_load(self.source, return_config=True)
        model, tokenizer, config = loaded
        if self.settings.cpu_column_major_weights and mx.default_device() == mx.cpu:
            column_major_weights(model)
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

    def warmup(self, stream: Any = None) -> None:
        """Two short batched generations (plain and seeded), so the first request does not pay
        for MLX's lazy set-up of the batched kernels. Runs in each batch thread."""
        from mlx_lm.generate import BatchGenerator

        ids = self._encode(Prompt(text="warm up"))
        gen = BatchGenerator(self.model, stop_tokens=[[t] for t in self._eos()], stream=stream)
        plain = GenerationParams(2, 0.7)
        seeded = GenerationParams(2, 0.7, seed=1)
        gen.insert(
            [ids, ids],
            max_tokens=[2, 2],
            samplers=[self._sampler(plain), self._sampler(seeded)],
        )
        for _ in range(16):
            _, responses = gen.next()
            if responses and all(r.finish_reason for r in responses):
                break
        gen.close()

    def start_workers(self, warm: bool = True) -> None:
        """Start the batch threads now (warmed up) instead of on the first request."""
        self._start(warm)

    def lane_count(self) -> int:
        """Batch threads (`decode_lanes`, default 1)."""
        return self.settings.decode_lanes

    def _start(self, warm: bool = True) -> None:
        with self._cond:
            if not self._lanes:
                self._lanes = [_Lane(i) for i in range(self.lane_count())]
                for lane in self._lanes:
                    threading.Thread(
                        target=self._loop,
                        args=(lane, warm and self.loaded),
                        name=f"tiffin-mlx-batch-{lane.index}",
                        daemon=True,
                    ).start()
        for lane in self._lanes:
            lane.ready.wait(120)

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

    # --- admission --------------------------------------------------------------------------

    def _eos(self) -> list[int]:
        assert self.table is not None
        return sorted(self.table.eos_ids)

    def _busy(self, message: str) -> LLMBusy:
        return LLMBusy(
            message,
            {
                "component": "llm",
                "queue_depth": len(self._queue),
                "running": self._running,
                "max_queue": self.settings.max_queue,
                "retry_after_s": 1.0,
            },
        )

    def _enqueue(self, seq: _Seq) -> None:
        with self._cond:
            if self._closed:
                raise LLMUnavailable("the mlx engine is shutting down")
            capacity = self.settings.max_concurrency + self.settings.max_queue
            if len(self._queue) + self._running >= capacity:
                raise self._busy(
                    f"the LLM queue is full ({self._running} generating, {len(self._queue)} "
                    f"waiting; TIFFIN_LLM_MAX_QUEUE={self.settings.max_queue})"
                )
            self._queue.append(seq)
            self._publish()
            self._cond.notify_all()

    def _withdraw(self, seq: _Seq) -> bool:
        """Take a request out of the queue if it is still there (it leaves at once, freeing its
        place); False when the batch thread already took it."""
        with self._cond:
            if seq.state != "waiting":
                return False
            seq.state = "done"
            with contextlib.suppress(ValueError):
                self._queue.remove(seq)
            self._publish()
            return True

    def _abandon(self, seq: _Seq) -> None:
        """The caller is gone (or done): free its place now. A queued request leaves the queue;
        a running one stops counting against admission at once and leaves the batch at the
        batch thread's next step (it sees `cancelled`)."""
        seq.cancelled.set()
        if self._withdraw(seq):
            return
        with self._cond:
            if seq.state == "running":
                seq.state = "leaving"
                self._running -= 1
                self._publish()

    def _release(self, seq: _Seq) -> None:
        with self._cond:
            if seq.state == "running":
                self._running -= 1
            seq.state = "done"
            self._publish()

    def _publish(self) -> None:
        m = llm_metrics()
        m.queue_depth.labels(self.model_id, self.model_version).set(len(self._queue))
        m.in_flight.labels(self.model_id, self.model_version).set(self._running)

    # --- the event-loop side ----------------------------------------------------------------

    async def stream(
        self, prompt: Prompt, params: GenerationParams, target: StructuredTarget | None = None
    ) -> AsyncIterator[Event]:
        if not self.loaded:
            raise LLMUnavailable("the mlx engine has no model loaded")
        arrived = time.monotonic()
        prompt_ids = self._encode(prompt)
        if not prompt_ids:
            raise InvalidInput("prompt: must not be empty")
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
        seq = _Seq(asyncio.get_running_loop(), prompt_ids, params, compiled, arrived, self.settings)
        self._enqueue(seq)
        self._start()
        try:
            while True:
                waiting = seq.state == "waiting"
                limit = seq.queue_deadline if waiting else seq.deadline + 5.0
                try:
                    item = await asyncio.wait_for(
                        seq.queue.get(), max(0.01, limit - time.monotonic())
                    )
                except TimeoutError as exc:
                    if self._withdraw(seq):  # still queued: its queue deadline has passed
                        raise self._busy(
                            f"waited {time.monotonic() - arrived:.1f}s in the LLM queue (limit "
                            f"{self.settings.queue_timeout_s:g}s)"
                        ) from exc
                    if time.monotonic() < seq.deadline + 5.0:
                        continue  # it joined the batch meanwhile: wait on its own deadline
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
            # A client that goes away: a queued request leaves the queue now, a running one
            # frees its place now and leaves the batch at the next decode step.
            self._abandon(seq)

    # --- the batch thread -------------------------------------------------------------------

    def _loop(self, lane: _Lane, warm: bool) -> None:
        """A batch thread. It never exits: a thread that has used MLX must not end while the
        process lives (MLX aborts with `terminate called without an active exception`)."""
        import mlx.core as mx

        # The thread's own default stream, as mlx_lm.server does: its model weights live there,
        # and generating on mlx-lm's separate `generation_stream` instead made every step pay
        # for cross-stream synchronisation (measured: 12-13 vs 18-20 tokens/s, bench-size model,
        # batch of 8, MLX CPU). Each lane thread has its own default stream, hence its own core.
        stream = mx.default_stream(mx.default_device())
        try:
            if warm:
                self.warmup(stream)
        except Exception:
            log.exception("mlx warm-up failed")
        finally:
            lane.ready.set()
        if self.settings.prefix_cache_size:
            from mlx_lm.models.cache import LRUPromptCache

            lane.prefixes = LRUPromptCache(
                max_size=self.settings.prefix_cache_size,
                max_bytes=self.settings.prefix_cache_max_mb << 20,
            )
        gen: Any = None
        active: dict[int, _Seq] = {}
        while True:
            if not active and gen is not None:
                # Idle: let the step mlx-lm evaluated ahead (async) finish before sleeping.
                with contextlib.suppress(Exception):
                    mx.synchronize(gen.stream)
            with self._cond:
                while not self._queue and not active:
                    lane.idle.set()  # outside MLX: the process may exit now (see _drain)
                    self._cond.wait()
                lane.idle.clear()
                newcomers = self._take(lane)
            try:
                if gen is None:
                    gen = self._generator(stream)
                try:
                    self._prime(lane, newcomers)
                except Exception:  # an optimisation: never fails a request
                    log.exception("processing a shared prompt prefix failed")
                for seq in newcomers:
                    self._join(lane, gen, active, seq)
                self._leave(lane, gen, active, [u for u, s in active.items() if self._gone(s)])
                if not active:
                    continue
                _, responses = gen.next()
            except Exception as exc:  # the model itself failed: every sequence in it fails
                log.exception("mlx batch step failed")
                for seq in active.values():
                    seq.emit(BackendFailure(f"the mlx engine failed: {type(exc).__name__}: {exc}"))
                    self._release(seq)
                active.clear()
                with self._cond:
                    lane.size = 0
                with contextlib.suppress(Exception):
                    gen.close()
                gen = None
                continue
            lane.steps += 1
            lane.peak = max(lane.peak, len(active))
            now = time.monotonic()
            done: list[int] = []
            _outbox.items = []
            try:
                self._dispatch(responses, active, done, now)
            finally:
                pending, _outbox.items = _outbox.items, None
                _flush(pending)
            for response in responses:  # retired by the generator (budget, end of sequence)
                if response.finish_reason is not None and response.uid in active:
                    self._remember(
                        lane, active[response.uid], response.prompt_cache, response.all_tokens
                    )
            self._leave(lane, gen, active, done)

    def _dispatch(
        self, responses: list[Any], active: dict[int, _Seq], done: list[int], now: float
    ) -> None:
        """Hand each generated token to its sequence; `done` collects the ones that are over."""
        for response in responses:
            current = active.get(response.uid)
            if current is None:
                continue
            seq = current
            try:
                over = self._on_token(seq, int(response.token), now)
                if over is None and response.finish_reason is not None:
                    over = ("length", False)  # its token budget ran out in the generator
            except Exception as exc:  # this sequence's bookkeeping failed: it alone ends
                log.exception("mlx sequence failed")
                seq.emit(BackendFailure(f"the mlx engine failed: {type(exc).__name__}: {exc}"))
                over = None
                done.append(response.uid)
                continue
            if over is not None:
                self._complete(seq, *over)
                done.append(response.uid)

    def _take(self, lane: _Lane) -> list[_Seq]:
        """Under the lock: the queued requests this lane takes into its batch now — its share of
        everything running or waiting across lanes, within `max_concurrency` overall."""
        lanes = len(self._lanes)
        total = sum(other.size for other in self._lanes) + len(self._queue)
        share = -(-total // lanes)  # ceil
        room = min(
            share - lane.size,
            self.settings.max_concurrency - self._running,
        )
        newcomers = []
        while self._queue and room > 0:
            seq = self._queue.popleft()
            seq.state = "running"
            self._running += 1
            lane.size += 1
            room -= 1
            newcomers.append(seq)
        if newcomers:
            self._publish()
        return newcomers

    def _generator(self, stream: Any) -> Any:
        from mlx_lm.generate import BatchGenerator

        width = max(8, self.settings.max_concurrency)
        return BatchGenerator(
            self.model,
            stream=stream,
            stop_tokens=[[t] for t in self._eos()],
            completion_batch_size=width,
            prefill_batch_size=min(8, width),
            prefill_step_size=self.settings.prefill_step_size,
        )

    def _gone(self, seq: _Seq) -> bool:
        """A running sequence that must leave the batch now: client gone, deadline passed, or
        its constrained decoding failed."""
        if seq.cancelled.is_set():
            return True
        if seq.failure is not None:
            log.error("constrained decoding failed for one sequence: %s", seq.failure)
            seq.emit(
                StructuredOutputFailed(
                    f"constrained decoding failed: {seq.failure}",
                    {"component": "llm", "engine": self.kind},
                )
            )
            return True
        if time.monotonic() > seq.deadline:
            log.warning("generation stopped at the request deadline")
            self._complete(seq, "length", False)
            return True
        return False

    def _join(self, lane: _Lane, gen: Any, active: dict[int, _Seq], seq: _Seq) -> None:
        now = time.monotonic()
        if seq.cancelled.is_set():
            self._release(seq)
            return
        if now > seq.queue_deadline:  # the event loop may not have noticed yet
            seq.emit(
                self._busy(
                    f"waited {now - seq.arrived:.1f}s in the LLM queue (limit "
                    f"{self.settings.queue_timeout_s:g}s)"
                )
            )
            self._release(seq)
            return
        assert self.table is not None
        seq.admitted_at = now
        llm_metrics().queue_wait.labels(self.model_id, self.model_version, self.kind).observe(
            now - seq.arrived
        )
        params = seq.params
        processors: list[Callable[[Any, Any], Any]] = []
        if seq.compiled is not None:
            seq.constraint = Constraint(seq.compiled, params.max_tokens, self.table.eos_ids)
            processors.append(self._processor(seq))
        seq.text = self.table.decoder()
        cache, cached = self._cached_prefix(lane, seq.prompt_ids)
        (uid,) = gen.insert(
            [seq.prompt_ids[cached:]],
            max_tokens=[params.max_tokens + 1],  # room for the end-of-sequence token
            caches=[cache] if cache is not None else None,
            all_tokens=[seq.prompt_ids[:cached]],
            samplers=[self._sampler(params)],
            logits_processors=[processors],
        )
        seq.uid = uid
        active[uid] = seq

    def _cached_prefix(self, lane: _Lane, prompt: list[int]) -> tuple[Any, int]:
        """A copy of the KV cache of the longest stored prefix of `prompt` (at most all but its
        last token: the generator needs one token to start from) and its length; (None, 0) when
        nothing stored is long enough to be worth it (`prefix_cache_min_tokens`)."""
        if lane.prefixes is None:
            return None, 0
        from mlx_lm.models.cache import trim_prompt_cache

        try:
            cache, rest = lane.prefixes.fetch_nearest_cache(self.model_id, prompt)
        except Exception:  # an optimisation: the prompt is processed in full instead
            log.exception("prefix cache lookup failed")
            return None, 0
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt is stored: give the last token back to the generator
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        cached = len(prompt) - len(rest)
        if cached < self.settings.prefix_cache_min_tokens:
            return None, 0
        lane.prefix_hits += 1
        lane.prefix_tokens += cached
        llm_metrics().prefix_cached_tokens.labels(self.model_id, self.model_version).inc(cached)
        return cache, cached

    def _prime(self, lane: _Lane, newcomers: list[_Seq]) -> None:
        """Newcomers arriving together whose prompts share a prefix nothing stored covers yet
        (a burst of requests with one system prompt): process that prefix once, for one of them,
        and store its cache, so that each of them copies it instead of processing it again.
        Without this only the second burst would benefit (caches are stored as sequences end).
        """
        if lane.prefixes is None or len(newcomers) < 2:
            return
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        floor = self.settings.prefix_cache_min_tokens
        groups: dict[tuple[int, ...], list[list[int]]] = {}
        for seq in newcomers:
            if len(seq.prompt_ids) > floor:
                groups.setdefault(tuple(seq.prompt_ids[:floor]), []).append(seq.prompt_ids)
        for prompts in groups.values():
            if len(prompts) < 2:
                continue
            shared = min(len(p) for p in prompts) - 1  # each keeps at least one token to prefill
            first = prompts[0]
            for other in prompts[1:]:
                shared = next((i for i in range(shared) if other[i] != first[i]), shared)
            prefix = first[:shared]
            _, rest = lane.prefixes.fetch_nearest_cache(self.model_id, prefix)
            if shared - (len(prefix) - len(rest)) < floor:
                continue  # what is stored already covers (nearly) all of it
            cache = make_prompt_cache(self.model)
            for start in range(0, shared, self.settings.prefill_step_size):
                chunk = prefix[start : start + self.settings.prefill_step_size]
                self.model(mx.array([chunk]), cache=cache)
                mx.eval([c.state for c in cache])
            lane.prefixes.insert_cache(self.model_id, prefix, _compact(cache), cache_type="system")
            lane.primed += 1

    def _remember(self, lane: _Lane, seq: _Seq, cache: Any, tokens: list[int] | None) -> None:
        """Store the KV cache of a finished sequence's prompt (what it generated trimmed off),
        keyed by the prompt's tokens, for later prompts that start the same way. An
        optimisation: a failure is logged, never raised into the batch thread."""
        if lane.prefixes is None or cache is None or tokens is None:
            return
        try:
            self._store(lane, seq, cache, tokens)
        except Exception:
            log.exception("storing a prompt cache failed")

    def _store(self, lane: _Lane, seq: _Seq, cache: Any, tokens: list[int]) -> None:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        prompt = seq.prompt_ids
        if len(tokens) < len(prompt) or tokens[: len(prompt)] != prompt:
            return  # left before its prompt was processed
        if not can_trim_prompt_cache(cache):
            return
        trim_prompt_cache(cache, len(tokens) - len(prompt))
        lane.prefixes.insert_cache(self.model_id, list(prompt), _compact(cache), cache_type="user")

    def _leave(self, lane: _Lane, gen: Any, active: dict[int, _Seq], uids: list[int]) -> None:
        if not uids:
            return
        # Sequences the generator already retired (budget or end-of-sequence) are not in it any
        # more; removing an unknown uid is a no-op there. The others' prompt caches are kept.
        caches = gen.remove(uids, return_prompt_caches=lane.prefixes is not None)
        for uid, (cache, tokens) in caches.items():
            if uid in active and active[uid].completed:
                self._remember(lane, active[uid], cache, tokens)
        for uid in uids:
            seq = active.pop(uid, None)
            if seq is not None:
                self._release(seq)
        with self._cond:
            lane.size = len(active)
            if self._queue:
                self._cond.notify_all()  # places are free: a lane may take the waiting now

    def _on_token(self, seq: _Seq, token: int, now: float) -> tuple[str, bool] | None:
        """Handle one generated token; (finish_reason, cut) when the sequence is over."""
        assert self.table is not None and seq.text is not None
        if token in self.table.eos_ids:
            return "stop", False
        if len(seq.generated) >= seq.params.max_tokens:
            return "length", False
        seq.generated.append(token)
        seq.last_at = now
        if seq.first_at is None:
            seq.first_at = now
        constraint = seq.constraint
        if constraint is not None:
            constraint.sync(seq.generated)
        piece, stopped = seq.stops.feed(seq.text.add(token))
        if piece:
            seq.emit(Delta(piece))
        if stopped:
            return "stop", True
        if constraint is not None and constraint.complete:
            return "stop", False
        if len(seq.generated) >= seq.params.max_tokens:
            return "length", False
        return None

    def _complete(self, seq: _Seq, finish: str, cut: bool) -> None:
        seq.completed = True
        if not cut and seq.text is not None:  # what the decoder and the stop matcher still hold
            piece, stopped = seq.stops.feed(seq.text.flush())
            tail = piece if stopped else piece + seq.stops.flush()
            if tail:
                seq.emit(Delta(tail))
        seq.emit(
            Finished(
                finish_reason=finish,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.generated),
                time_to_first_token_s=(seq.first_at - seq.arrived) if seq.first_at else None,
                decode_s=(seq.last_at - seq.first_at) if seq.first_at else 0.0,
                total_s=time.monotonic() - seq.arrived,
                queue_s=seq.admitted_at - seq.arrived,
            )
        )

    def _processor(self, seq: _Seq) -> Callable[[Any, Any], Any]:
        """The sequence's constrained-decoding mask, applied to its row of the batch's logits.

        mlx-lm calls it with the sequence's tokens so far (prompt + generated, the last one
        sampled a step ago and not yet seen by the batch thread), so it advances the walk itself.
        It never raises: an exception inside the batch step would fail every sequence, so a
        failure is recorded and this sequence alone is ended by the batch thread."""
        import mlx.core as mx

        constraint = seq.constraint
        assert constraint is not None
        prompt_len = len(seq.prompt_ids)

        def apply(tokens: Any, logits: Any) -> Any:
            if seq.failure is not None:
                return logits
            try:
                start = prompt_len + len(constraint.tokens) + (1 if constraint.ended else 0)
                if int(tokens.size) > start:
                    for token in tokens[start:].tolist():
                        constraint.advance(int(token))
                return logits + mx.array(constraint.bias(int(logits.shape[-1])))
            except Exception as exc:
                seq.failure = exc
                return logits

        return apply

    def _sampler(self, params: GenerationParams) -> Callable[[Any], Any]:
        """Unseeded requests with the same temperature and top-p share one sampler object, so
        mlx-lm samples their rows in one batched call; a seeded request gets its own random key,
        so its output depends on its seed only, not on what else is in the batch."""
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p, greedy_sampler, make_sampler

        if params.temperature == 0:
            return greedy_sampler
        if params.seed is None:
            key = (params.temperature, params.top_p)
            sampler = self._samplers.get(key)
            if sampler is None:
                sampler = self._samplers[key] = make_sampler(
                    temp=params.temperature, top_p=params.top_p
                )
            return sampler
        state = [mx.random.key(params.seed)]
        scale = 1.0 / params.temperature
        top_p = params.top_p

        def seeded(logprobs: Any) -> Any:
            state[0], sub = mx.random.split(state[0])
            if 0 < top_p < 1.0:
                logprobs = apply_top_p(logprobs, top_p)
            return mx.random.categorical(logprobs * scale, key=sub)

        return seeded

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
                llm_metrics().structured_failures.labels(
                    self.model_id, self.model_version, self.kind, "attempt"
                ).inc()
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
            "batching": "continuous",
            "queue_depth": len(self._queue),
            "running": self._running,
            "max_concurrency": self.settings.max_concurrency,
            "max_queue": self.settings.max_queue,
            "lanes": len(self._lanes),
            "decode_steps": sum(lane.steps for lane in self._lanes),
            "peak_batch": max((lane.peak for lane in self._lanes), default=0),
            "lane_peaks": [lane.peak for lane in self._lanes],
            "prefix_cache": {
                "enabled": self.settings.prefix_cache_size > 0,
                "hits": sum(lane.prefix_hits for lane in self._lanes),
                "cached_prompt_tokens": sum(lane.prefix_tokens for lane in self._lanes),
                "primed_prefixes": sum(lane.primed for lane in self._lanes),
            },
        }
        if self.loaded:
            out["context_window"] = self.context_window
            out["vocab_size"] = self.table.size if self.table else None
            out["load_seconds"] = round(self.load_seconds or 0.0, 3)
            path = Path(self.source)
            out["source_kind"] = "directory" if path.exists() else "hub"
        return out

    def _drain(self, timeout_s: float = 5.0) -> None:
        """At interpreter exit, wait (briefly) until every batch thread is idle: MLX aborts the
        process (`terminate called without an active exception`) if it is torn down while a
        thread is inside it, and a caller may exit the moment its last event arrives."""
        if not self._lanes:
            return
        with self._cond:
            self._closed = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                idle = all(lane.idle.is_set() for lane in self._lanes)
                if not self._queue and not self._running and idle:
                    return
            time.sleep(0.01)

    async def aclose(self) -> None:
        with self._cond:
            self._closed = True


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
