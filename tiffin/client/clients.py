"""`TiffinClient` (sync) and `AsyncTiffinClient`: one method per endpoint, typed answers.

Remote mode talks HTTP to a running service; local mode runs the very same calls in process
against `tiffin.app.local_app()` (the whole composition root: model store, embedded feature
store, router) through `httpx.ASGITransport`, so both modes give identical answers and errors.
The sync client's local mode drives the async client on one event loop in a helper thread
(anyio's blocking portal): the in-process app keeps one loop for its whole life, as its
loop-bound resources (feature store connections, background tasks) need.

Retries: a 503, a 429 or a request that never reached the service is tried again, up to
`retries` times, waiting `Retry-After` when the service sends it, else an exponential backoff
with full jitter. Any other answer is final: a scoring request the service has seen is never
repeated.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import httpx

from tiffin.client import calls
from tiffin.client.calls import Call
from tiffin.client.errors import ServerError, TiffinClientError, TransportError, error_for
from tiffin.client.settings import ClientSettings

P = ParamSpec("P")
T = TypeVar("T")
LOCAL_BASE_URL = "http://tiffin.local"
REQUEST_ID_HEADER = "X-Request-ID"
# Failures where the request provably never reached the service: safe to repeat even a POST.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def retry_after_s(value: str | None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_delay(
    settings: ClientSettings,
    attempt: int,
    call: Call[Any],
    response: httpx.Response | None,
    error: httpx.TransportError | None,
    rng: random.Random,
) -> float | None:
    """How long to wait before attempt `attempt + 1`, or None when this outcome is final."""
    if attempt >= settings.retries:
        return None
    if error is not None:
        if call.method != "GET" and not isinstance(error, _NOT_SENT):
            return None  # the service may have acted on it
    elif response is None or response.status_code not in call.retry_statuses:
        return None
    backoff = min(settings.max_backoff_s, settings.backoff_s * 2**attempt) * rng.random()
    if response is not None:
        asked = retry_after_s(response.headers.get("retry-after"))
        if asked is not None:
            return asked if asked <= settings.max_retry_after_s else None
    return backoff


class Attempts:
    """One call's tries and retry policy, with the I/O left to the client that owns it: both
    clients run the same loop (build `request`, send it, ask `retry_in`, sleep or stop with
    `result`), the sync one blocking and the async one awaiting. Every try carries one request
    id, so the service's logs show one logical request."""

    def __init__(
        self, settings: ClientSettings, call: Call[T], rng: random.Random, stream: bool = False
    ) -> None:
        self.settings = settings
        self.call = call
        self.rng = rng
        self.stream = stream
        self.request_id = uuid.uuid4().hex
        self.tried = 0

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        call = self.call
        return http.build_request(
            call.method,
            call.path,
            json={**call.json, "stream": True} if self.stream else call.json,
            params=call.params,
            headers={REQUEST_ID_HEADER: self.request_id},
        )

    def retry_in(
        self, response: httpx.Response | None = None, error: httpx.TransportError | None = None
    ) -> float | None:
        """Seconds to wait before trying again after this outcome; None when it is final."""
        delay = retry_delay(self.settings, self.tried, self.call, response, error, self.rng)
        self.tried += 1
        return delay

    def failure(self, error: httpx.TransportError) -> TransportError:
        """The typed error of a request that got no answer after its last try."""
        kind = "timed out" if isinstance(error, httpx.TimeoutException) else "failed"
        return TransportError(f"request {kind}: {error!r}", request_id=self.request_id)

    def result(self, response: httpx.Response) -> Any:
        """The typed answer of a final response, or the typed error it stands for."""
        call, request_id = self.call, self.request_id
        if response.status_code in call.answers:
            try:
                return call.parse(response.text if call.text else response.json())
            except (ValueError, KeyError, TypeError) as exc:  # ValidationError is a ValueError
                raise TiffinClientError(
                    f"{call.method} {call.path}: unexpected answer ({exc})",
                    status=response.status_code,
                    body=response.text,
                    request_id=request_id,
                ) from exc
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        raise error_for(
            response.status_code, body, response.headers.get("x-request-id") or request_id
        )

    def event_text(self, line: str) -> str | None:
        """The text of one server-sent `data:` line of a stream; None for the closing event;
        raises for an error event (the LLM failed after the stream had started)."""
        if not line.startswith("data: "):
            return ""
        event = json.loads(line[6:])
        if "error" in event:
            raise ServerError(
                str(event["error"]), status=200, body=event, request_id=self.request_id
            )
        if event.get("done"):
            return None
        return str(event.get("text", ""))


def _settings(
    url: str | None,
    local: bool | None,
    timeout_s: float | None,
    retries: int | None,
    token: str | None,
) -> tuple[ClientSettings, bool]:
    settings = ClientSettings()
    update: dict[str, Any] = {}
    if url is not None:
        update["url"] = url
    if timeout_s is not None:
        update["timeout_s"] = timeout_s
    if retries is not None:
        update["retries"] = retries
    if token is not None:
        from pydantic import SecretStr

        update["token"] = SecretStr(token)
    settings = settings.model_copy(update=update)
    if local is None:  # an explicit URL means remote; otherwise seed 003's switch decides
        local = url is None and not settings.remote_enabled
    return settings, local


def _headers(settings: ClientSettings) -> dict[str, str]:
    headers = {"User-Agent": "tiffin-client"}
    if settings.token is not None:
        headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
    return headers


def _local_app() -> Any:
    try:
        from tiffin.app import local_app  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        raise TiffinClientError(
            "local mode needs tiffin.app.local_app (issue 9); set REMOTE_INFERENCE_ENABLED=true "
            "and REMOTE_INFERENCE_URL, or pass url=..."
        ) from exc
    return local_app()


def _async_method(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncTiffinClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncTiffinClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.send(build(*args, **kwargs))

    method.__name__ = build.__name__
    method.__doc__ = build.__doc__
    return method


def _sync_method(build: Callable[P, Call[T]]) -> Callable[Concatenate[TiffinClient, P], T]:
    def method(self: TiffinClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.send(build(*args, **kwargs))

    method.__name__ = build.__name__
    method.__doc__ = build.__doc__
    return method


class AsyncTiffinClient:
    """Async client. `AsyncTiffinClient("http://host:3000")` is remote; `AsyncTiffinClient()`
    follows `REMOTE_INFERENCE_ENABLED` / `REMOTE_INFERENCE_URL` (local when unset, as in seed
    003); `local=True` or `app=<ASGI app>` runs in process. `transport` replaces the HTTP layer."""

    def __init__(
        self,
        url: str | None = None,
        *,
        local: bool | None = None,
        app: Any = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings, self.local = _settings(
            url, True if app is not None else local, timeout_s, retries, token
        )
        if self.local and transport is None:
            # raise_app_exceptions=False: an app failure is a 500 answer, exactly as over HTTP.
            transport = httpx.ASGITransport(
                app=app if app is not None else _local_app(), raise_app_exceptions=False
            )
        self._http = httpx.AsyncClient(
            base_url=LOCAL_BASE_URL if self.local else self.settings.url,
            transport=transport,
            timeout=self.settings.timeout_s,
            headers=_headers(self.settings),
        )
        self._rng = rng or random.Random()

    async def send(self, call: Call[T]) -> T:
        """Run one call with retries; the typed answer or a `TiffinClientError`."""
        attempts = Attempts(self.settings, call, self._rng)
        while True:
            try:
                response = await self._http.send(attempts.request(self._http))
            except httpx.TransportError as exc:
                if (delay := attempts.retry_in(error=exc)) is None:
                    raise attempts.failure(exc) from exc
            else:
                if (delay := attempts.retry_in(response)) is None:
                    return cast(T, attempts.result(response))
            await asyncio.sleep(delay)

    async def generate_stream(
        self,
        prompt: str,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> AsyncIterator[str]:
        """`POST /generate` with `"stream": true`: the text as it is generated. A refusal before
        the stream starts (503, 422) raises like any call; 503 and unsent requests are retried."""
        call = calls.generate(prompt, system, max_tokens, temperature, top_p, stop, seed)
        attempts = Attempts(self.settings, call, self._rng, stream=True)
        while True:
            try:
                response = await self._http.send(attempts.request(self._http), stream=True)
            except httpx.TransportError as exc:
                if (delay := attempts.retry_in(error=exc)) is None:
                    raise attempts.failure(exc) from exc
            else:
                try:
                    if response.status_code == 200:
                        async for line in response.aiter_lines():
                            if (text := attempts.event_text(line)) is None:
                                return
                            if text:
                                yield text
                        return
                    await response.aread()
                    if (delay := attempts.retry_in(response)) is None:
                        attempts.result(response)  # raises the typed error
                        return
                finally:
                    await response.aclose()
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncTiffinClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    predict_fraud = _async_method(calls.predict_fraud)
    predict_ctr = _async_method(calls.predict_ctr)
    predict_bid = _async_method(calls.predict_bid)
    score_fraud = _async_method(calls.score_fraud)
    score_personalization = _async_method(calls.score_personalization)
    score_batch = _async_method(calls.score_batch)
    predict = _async_method(calls.predict)
    predict_batch = _async_method(calls.predict_batch)
    v1_predict = _async_method(calls.v1_predict)
    v1_models = _async_method(calls.v1_models)
    health = _async_method(calls.health)
    ready = _async_method(calls.ready)
    models = _async_method(calls.models)
    model = _async_method(calls.model)
    metrics = _async_method(calls.metrics)
    generate = _async_method(calls.generate)
    generate_structured = _async_method(calls.generate_structured)
    circuit_breaker_status = _async_method(calls.circuit_breaker_status)
    circuit_breaker_reset = _async_method(calls.circuit_breaker_reset)
    llm_status = _async_method(calls.llm_status)
    register_model = _async_method(calls.register_model)
    activate = _async_method(calls.activate)
    deploy = _async_method(calls.deploy)
    reload = _async_method(calls.reload)
    traffic_split = _async_method(calls.traffic_split)
    set_traffic_split = _async_method(calls.set_traffic_split)
    set_shadows = _async_method(calls.set_shadows)
    version_metrics = _async_method(calls.version_metrics)
    deployments = _async_method(calls.deployments)
    deployment = _async_method(calls.deployment)
    events = _async_method(calls.events)
    start_ab_test = _async_method(calls.start_ab_test)
    ab_tests = _async_method(calls.ab_tests)
    stop_ab_test = _async_method(calls.stop_ab_test)


class TiffinClient:
    """Sync client with the same methods and answers as `AsyncTiffinClient` (see there for how
    the mode is chosen). Remote mode is plain blocking httpx; local mode runs the async client on
    a private event loop thread, so it also works where a loop is already running (notebooks)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        local: bool | None = None,
        app: Any = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings, self.local = _settings(
            url, True if app is not None else local, timeout_s, retries, token
        )
        self._rng = rng or random.Random()
        self._portal_cm: AbstractContextManager[Any] | None = None
        self._portal: Any = None
        self._async: AsyncTiffinClient | None = None
        self._http: httpx.Client | None = None
        if self.local and transport is None:
            from anyio.from_thread import start_blocking_portal

            # Built on this thread, not the portal's: the LLM warms up with MLX there, and a
            # thread that used MLX must outlive the process (MLX aborts when it exits).
            app = app if app is not None else _local_app()
            self._portal_cm = start_blocking_portal()
            self._portal = self._portal_cm.__enter__()
            try:
                self._async = self._portal.call(self._make_async, app)
            except BaseException:
                self._portal_cm.__exit__(None, None, None)
                raise
        else:
            self._http = httpx.Client(
                base_url=LOCAL_BASE_URL if self.local else self.settings.url,
                transport=transport,
                timeout=self.settings.timeout_s,
                headers=_headers(self.settings),
            )

    async def _make_async(self, app: Any) -> AsyncTiffinClient:
        return AsyncTiffinClient(
            local=True,
            app=app,
            timeout_s=self.settings.timeout_s,
            retries=self.settings.retries,
            token=self.settings.token.get_secret_value() if self.settings.token else None,
            rng=self._rng,
        )

    def send(self, call: Call[T]) -> T:
        """Run one call with retries; the typed answer or a `TiffinClientError`."""
        if self._async is not None:
            result: T = self._portal.call(self._async.send, call)
            return result
        assert self._http is not None
        attempts = Attempts(self.settings, call, self._rng)
        while True:
            try:
                response = self._http.send(attempts.request(self._http))
            except httpx.TransportError as exc:
                if (delay := attempts.retry_in(error=exc)) is None:
                    raise attempts.failure(exc) from exc
            else:
                if (delay := attempts.retry_in(response)) is None:
                    return cast(T, attempts.result(response))
            time.sleep(delay)

    def generate_stream(
        self,
        prompt: str,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """`POST /generate` with `"stream": true`: the text as it is generated (see the async
        client)."""
        args = (prompt, system, max_tokens, temperature, top_p, stop, seed)
        if self._async is not None:  # local: step the async generator on the portal's loop
            stream = self._async.generate_stream(*args)
            while True:
                try:
                    yield self._portal.call(stream.__anext__)
                except StopAsyncIteration:
                    return
        assert self._http is not None
        call = calls.generate(*args)
        attempts = Attempts(self.settings, call, self._rng, stream=True)
        while True:
            try:
                response = self._http.send(attempts.request(self._http), stream=True)
            except httpx.TransportError as exc:
                if (delay := attempts.retry_in(error=exc)) is None:
                    raise attempts.failure(exc) from exc
            else:
                try:
                    if response.status_code == 200:
                        for line in response.iter_lines():
                            if (text := attempts.event_text(line)) is None:
                                return
                            if text:
                                yield text
                        return
                    response.read()
                    if (delay := attempts.retry_in(response)) is None:
                        attempts.result(response)  # raises the typed error
                        return
                finally:
                    response.close()
            time.sleep(delay)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._async is not None and self._portal_cm is not None:
            self._portal.call(self._async.aclose)
            self._portal_cm.__exit__(None, None, None)
            self._async = None

    def __enter__(self) -> TiffinClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    predict_fraud = _sync_method(calls.predict_fraud)
    predict_ctr = _sync_method(calls.predict_ctr)
    predict_bid = _sync_method(calls.predict_bid)
    score_fraud = _sync_method(calls.score_fraud)
    score_personalization = _sync_method(calls.score_personalization)
    score_batch = _sync_method(calls.score_batch)
    predict = _sync_method(calls.predict)
    predict_batch = _sync_method(calls.predict_batch)
    v1_predict = _sync_method(calls.v1_predict)
    v1_models = _sync_method(calls.v1_models)
    health = _sync_method(calls.health)
    ready = _sync_method(calls.ready)
    models = _sync_method(calls.models)
    model = _sync_method(calls.model)
    metrics = _sync_method(calls.metrics)
    generate = _sync_method(calls.generate)
    generate_structured = _sync_method(calls.generate_structured)
    circuit_breaker_status = _sync_method(calls.circuit_breaker_status)
    circuit_breaker_reset = _sync_method(calls.circuit_breaker_reset)
    llm_status = _sync_method(calls.llm_status)
    register_model = _sync_method(calls.register_model)
    activate = _sync_method(calls.activate)
    deploy = _sync_method(calls.deploy)
    reload = _sync_method(calls.reload)
    traffic_split = _sync_method(calls.traffic_split)
    set_traffic_split = _sync_method(calls.set_traffic_split)
    set_shadows = _sync_method(calls.set_shadows)
    version_metrics = _sync_method(calls.version_metrics)
    deployments = _sync_method(calls.deployments)
    deployment = _sync_method(calls.deployment)
    events = _sync_method(calls.events)
    start_ab_test = _sync_method(calls.start_ab_test)
    ab_tests = _sync_method(calls.ab_tests)
    stop_ab_test = _sync_method(calls.stop_ab_test)
