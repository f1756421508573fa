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


def runner_error(exc: Exception, runner: str) -> Exception:
    """A runner's answer as the typed error it was on the runner's side."""
    status = int(getattr(exc, "error_code", 0) or 0)
    message = str(getattr(exc, "message", None) or exc)
    # BentoML's client prefixes "Error making request: <status>: <body>"; keep the runner's words.
    if status == 404:
        return ModelNotFound(message)
    if status == 422:
        return ModelLoadError(message)
    if status == 400:
        return InvalidInput(message)
    return RunnerUnavailable(f"runner {runner!r} is unavailable: {message}")


class RemoteFamily:
    """A family served by a runner service reached through a BentoML client proxy.

    Inference is pure, so a call whose connection dropped before any answer is sent again once:
    that is how BentoML's hop lost requests under load (a pooled keep-alive connection the runner
    closed just as it was reused; docs/upstream.md).
    """

    def __init__(self, name: str, runner: Any, runner_name: str, timeout_s: float) -> None:
        self.name = name
        self.runner = runner
        self.runner_name = runner_name
        self.timeout_s = timeout_s
        self._refs: dict[str, RemoteRef] = {}
        self._default: str | None = None
        self._lock = threading.Lock()

    @property
    def default_version(self) -> str:
        if self._default is None:
            self._default = str(self._sync("default_version", family=self.name))
        return self._default

    async def ref(self, version: str | None) -> ModelRef:
        version = version or self.default_version
        found = self._refs.get(version)
        if found is None:
            card = await self._async("card", family=self.name, version=version)
            found = RemoteRef(self.name, str(card["version"]), ModelCard(**card["card"]))
            self._refs[version] = found
        return found

    async def predict(self, ref: ModelRef, rows: np.ndarray, explain: bool) -> Prediction:
        job = Job(family=self.name, version=ref.version, rows=rows.tolist(), explain=explain)
        (result,) = await self._async("predict", jobs=[job])
        answer = JobResult.model_validate(result)
        scores = np.asarray(answer.scores, dtype=np.float32)
        contributions = (
            None if answer.contributions is None else np.asarray(answer.contributions, np.float32)
        )
        return scores, contributions

    def load(self, version: str) -> None:
        self._sync("load", family=self.name, version=version)

    def reload_loaded(self) -> None:
        self._refs.clear()
        self._sync("reload", family=self.name)

    def describe(self) -> list[dict[str, Any]]:
        described = self._sync("describe")
        return list(described.get(self.name, []))

    def _sync(self, api: str, **kwargs: Any) -> Any:
        try:
            return self.runner.to_sync.call(api, **kwargs)
        except Exception as exc:
            raise runner_error(exc, self.runner_name) from exc

    async def _async(self, api: str, **kwargs: Any) -> Any:
        import httpx

        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(
                    self.runner.to_async.call(api, **kwargs), self.timeout_s
                )
            except (httpx.RemoteProtocolError, httpx.ConnectError) as exc:
                if attempt == 2:
                    raise RunnerUnavailable(
                        f"runner {self.runner_name!r} is unavailable: {exc}"
                    ) from exc
            except TimeoutError as exc:
                raise RunnerUnavailable(
                    f"runner {self.runner_name!r} did not answer within {self.timeout_s:g}s"
                ) from exc
            except Exception as exc:
                raise runner_error(exc, self.runner_name) from exc
        raise AssertionError("unreachable")


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

    def get(self, name: str) -> Family:
        found = self.dedicated.get(name) or self._others.get(name)
        if found is not None:
            return found
        if self._generic is None:
            raise ModelNotFound(f"model {name!r} is not in the model store")
        with self._lock:
            if name not in self._others:
                self._others[name] = self._generic(name)
            return self._others[name]

    def find(self, name: str) -> Family | None:
        try:
            return self.get(name)
        except ModelNotFound:
            return None

    def loaded(self) -> dict[str, Family]:
        return {**self.dedicated, **self._others}
