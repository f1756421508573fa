"""A model family as the request pipeline and the lifecycle see it, wherever its runner runs.

`Family` is the whole contract: which versions exist, what a version's card says (feature order,
task, output names), predict (and explain) rows with a version, load and warm a version before
traffic goes to it. `LocalFamily` calls a `ModelPool` in this process (no copy, no hop);
`RemoteFamily` calls a runner service's API through BentoML's client, in a separate process or
on another machine. `Families` resolves a family name to one of them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import numpy as np
from pydantic import BaseModel

from tiffin.errors import InvalidInput, ModelLoadError, ModelNotFound, RunnerUnavailable
from tiffin.metrics import metrics
from tiffin.model_pool import ModelPool
from tiffin.model_store import ModelCard

log = logging.getLogger("tiffin.families")


class ModelRef(Protocol):
    """One version of a family, as much as the pipeline needs before it predicts."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def card(self) -> ModelCard: ...

    @property
    def n_features(self) -> int: ...


Prediction = tuple[np.ndarray, np.ndarray | None]
"""Scores, and per-feature contributions when asked for (zeros when the model has none)."""


class Family(Protocol):
    name: str

    @property
    def default_version(self) -> str: ...

    async def ref(self, version: str | None) -> ModelRef: ...

    async def predict(self, ref: ModelRef, rows: np.ndarray, explain: bool) -> Prediction: ...

    def load(self, version: str) -> None: ...

    def reload_loaded(self) -> None: ...

    def describe(self) -> list[dict[str, Any]]: ...


# --- in process -------------------------------------------------------------------------------


def predict_local(model: Any, rows: np.ndarray, explain: bool) -> Prediction:
    """Explanations are an extra: a version whose explainer fails still serves its scores."""
    if not explain:
        return model.predict(rows), None
    try:
        scores, contributions = model.predict_explained(rows)
        return scores, contributions
    except Exception as exc:
        log.warning("%s:%s failed to predict with explanations: %s", model.name, model.version, exc)
        metrics().errors.labels(model.name, model.version, "explain").inc()
        return model.predict(rows), np.zeros_like(rows)


class LocalFamily:
    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self.name = pool.family

    @property
    def default_version(self) -> str:
        return self.pool.default_version

    async def ref(self, version: str | None) -> ModelRef:
        return self.pool.get(version)

    async def predict(self, ref: ModelRef, rows: np.ndarray, explain: bool) -> Prediction:
        return predict_local(ref, rows, explain)

    def load(self, version: str) -> None:
        self.pool.load(version)

    def reload_loaded(self) -> None:
        self.pool.reload_loaded()

    def describe(self) -> list[dict[str, Any]]:
        return self.pool.describe()


# --- through a runner service -----------------------------------------------------------------


class Job(BaseModel):
    """Rows for one family and version: the unit a runner's batching `predict` API groups."""

    family: str
    version: str | None = None
    rows: list[list[float]]
    explain: bool = False


class JobResult(BaseModel):
    version: str
    scores: list[Any]
    contributions: list[list[float]] | None = None


@dataclass(frozen=True)
class RemoteRef:
    name: str
    version: str
    card: ModelCard

    @property
    def n_features(self) -> int:
        return len(self.card.feature_names)


class RunnerClient:
    """JSON over HTTP to one runner service's API, sync (lifecycle thread, admin calls) and
    async (the request path). BentoML serves each `@bentoml.api` at `/<name>`; adaptive batching
    happens on the runner's side whatever the client.

    Why not BentoML's own client: its aiohttp session is replaced every 100 requests by closing
    the old one, connections of requests still in flight included, which is how the hop dropped
    requests under load (`ServerDisconnectedError`; docs/upstream.md). Its sync client also only
    runs inside AnyIO worker threads, not the lifecycle's.
    """

    def __init__(self, name: str, url: str, timeout_s: float) -> None:
        import httpx

        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        parsed = urlparse(url)
        if parsed.scheme == "file":  # BentoML's local socket for a runner it started
            socket = unquote(parsed.path)
            self.base_url = "http://runner"
            self._sync_transport: Any = httpx.HTTPTransport(uds=socket)
            self._async_transport: Any = httpx.AsyncHTTPTransport(uds=socket)
        else:
            self.base_url = f"http://{parsed.netloc}" if parsed.scheme == "tcp" else url
            self._sync_transport = self._async_transport = None
        # An idle connection is dropped well before the runner's server closes it (uvicorn's
        # keep-alive is 5 s; httpx's default expiry is also 5 s): with equal timeouts a request
        # can be written to a connection the server is closing at that instant.
        limits = httpx.Limits(
            max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0
        )
        self.sync = httpx.Client(
            base_url=self.base_url, transport=self._sync_transport, timeout=timeout_s
        )
        self.async_ = httpx.AsyncClient(
            base_url=self.base_url,
            transport=self._async_transport,
            timeout=timeout_s,
            limits=limits,
        )

    def call(self, api: str, **body: Any) -> Any:
        import httpx

        try:
            response = self.sync.post(f"/{api}", json=body)
        except httpx.HTTPError as exc:
            raise self._down(exc) from exc
        return self._answer(response)

    async def acall(self, api: str, **body: Any) -> Any:
        import httpx

        for attempt in (1, 2):
            try:
                response = await self.async_.post(f"/{api}", json=body)
                return self._answer(response)
            except httpx.TimeoutException as exc:
                raise RunnerUnavailable(
                    f"runner {self.name!r} did not answer within {self.timeout_s:g}s"
                ) from exc
            except httpx.TransportError as exc:
                # Inference is pure: a call whose connection broke (reset, closed before the
                # answer, refused during a restart) is safe to send once more.
                if attempt == 2:
                    raise self._down(exc) from exc
            except httpx.HTTPError as exc:
                raise self._down(exc) from exc
        raise AssertionError("unreachable")

    async def ready(self) -> bool:
        response = await self.async_.get("/readyz", timeout=2.0)
        return response.status_code == 200

    def ready_sync(self) -> bool:
        import httpx

        try:
            return self.sync.get("/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _down(self, exc: Exception) -> RunnerUnavailable:
        return RunnerUnavailable(
            f"runner {self.name!r} is unavailable: {exc or type(exc).__name__}"
        )

    def _answer(self, response: Any) -> Any:
        if response.status_code == 200:
            json_body = response.headers.get("content-type", "").startswith("application/json")
            return response.json() if json_body else response.text  # a `str` API answers text
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, list) and len(body) == 1:  # BentoML wraps some 4xx bodies in a list
            body = body[0]
        message = (
            str(body.get("error") or response.text) if isinstance(body, dict) else response.text
        )
        status = response.status_code
        if status == 404:
            raise ModelNotFound(message)
        if status == 422:
            raise ModelLoadError(message)
        if status == 400:
            raise InvalidInput(message)
        raise RunnerUnavailable(f"runner {self.name!r} answered {status}: {message}")


class RemoteFamily:
    """A family served by a runner service in another process or on another machine."""

    def __init__(self, name: str, client: RunnerClient) -> None:
        self.name = name
        self.client = client
        self._refs: dict[str, RemoteRef] = {}
        self._default: str | None = None

    @property
    def default_version(self) -> str:
        if self._default is None:
            self._default = str(self.client.call("default_version", family=self.name))
        return self._default

    async def ref(self, version: str | None) -> ModelRef:
        if version is None:
            if self._default is None:  # asked without blocking the event loop
                self._default = str(await self.client.acall("default_version", family=self.name))
            version = self._default
        found = self._refs.get(version)
        if found is None:
            card = await self.client.acall("card", family=self.name, version=version)
            found = RemoteRef(self.name, str(card["version"]), ModelCard(**card["card"]))
            self._refs[version] = found
        return found

    async def predict(self, ref: ModelRef, rows: np.ndarray, explain: bool) -> Prediction:
        job = Job(family=self.name, version=ref.version, rows=rows.tolist(), explain=explain)
        (result,) = await self.client.acall("predict", jobs=[job.model_dump()])
        answer = JobResult.model_validate(result)
        scores = np.asarray(answer.scores, dtype=np.float32)
        contributions = (
            None if answer.contributions is None else np.asarray(answer.contributions, np.float32)
        )
        return scores, contributions

    def load(self, version: str) -> None:
        self.client.call("load", family=self.name, version=version)

    def reload_loaded(self) -> None:
        self._refs.clear()
        self.client.call("reload", family=self.name)

    def describe(self) -> list[dict[str, Any]]:
        return list(self.client.call("describe").get(self.name, []))


# --- the registry -----------------------------------------------------------------------------


class Families:
    """Family name -> Family. Dedicated runners first; any other name is the generic runner's,
    created on first use when the model store has it."""

    def __init__(
        self, dedicated: Mapping[str, Family], generic: Callable[[str], Family] | None
    ) -> None:
        self.dedicated = dict(dedicated)
        self._generic = generic
        self._others: dict[str, Family] = {}
        self._lock = threading.Lock()

    def _known(self, name: str) -> Family | None:
        return self.dedicated.get(name) or self._others.get(name)

    def get(self, name: str) -> Family:
        found = self._known(name)
        if found is not None:
            return found
        if self._generic is None:
            raise ModelNotFound(f"model {name!r} is not in the model store")
        with self._lock:
            if name not in self._others:
                self._others[name] = self._generic(name)
            return self._others[name]

    async def aget(self, name: str) -> Family:
        """`get` for the request path: a family met for the first time may need a call to a
        remote runner (is it in the store?), made on a worker thread, so a client asking for
        names that do not exist stalls its own request, not the event loop."""
        found = self._known(name)
        if found is not None:
            return found
        return await asyncio.to_thread(self.get, name)

    def find(self, name: str) -> Family | None:
        try:
            return self.get(name)
        except ModelNotFound:
            return None

    def loaded(self) -> dict[str, Family]:
        return {**self.dedicated, **self._others}
