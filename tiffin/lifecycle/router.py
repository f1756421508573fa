"""Which version answers a request, and what happens when it fails.

One place decides for every pipeline: a version the client pinned, else the family's current
route (sticky weighted split, canary step, A/B arm) from the worker's `LifecycleManager`, else the
family's default. A routed version that fails or returns non-finite scores is recorded against
itself and the request is answered by the stable version; shadow versions score a copy after
the answer is sent. A request reads the lifecycle's state once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import numpy as np

from tiffin.drift import DriftRecorder
from tiffin.errors import InvalidInput, ModelUnavailable, RunnerUnavailable
from tiffin.families import Families, Family, ModelRef
from tiffin.lifecycle.manager import LifecycleManager, Route
from tiffin.lifecycle.traffic import pick_version, sticky_bucket
from tiffin.metrics import Observation

log = logging.getLogger("tiffin.router")


@dataclass(frozen=True)
class Choice:
    family: Family
    ref: ModelRef
    route: Route | None
    pinned: bool


@dataclass
class Answer:
    ref: ModelRef
    scores: np.ndarray
    contributions: np.ndarray | None
    observation: Observation


class Router:
    def __init__(
        self,
        families: Families,
        lifecycle: LifecycleManager | None,
        drift: DriftRecorder | None = None,
    ) -> None:
        self.families = families
        self.lifecycle = lifecycle
        self.drift = drift
        """Counts the answered rows in the answering version's reference bins (tiffin.drift)."""
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    async def choose(self, family: str, entity: str | None, pinned: str | None = None) -> Choice:
        """The version for this request: pinned, else routed (sticky per entity), else default."""
        serving = await self.families.aget(family)
        route = self.lifecycle.route(family) if self.lifecycle is not None else None
        version = pinned
        if version is None and route is not None:
            if len(route.weights) == 1:
                version = next(iter(route.weights))
            else:
                bucket = sticky_bucket(family, entity) if entity else random.randrange(10_000)
                version = pick_version(route.weights, bucket)
        return Choice(serving, await serving.ref(version), route, pinned is not None)

    async def predict(
        self, choice: Choice, rows: np.ndarray, started: float, explain: bool = False
    ) -> Answer:
        ref = choice.ref
        observation = Observation(ref.name, ref.version, started, len(rows))
        try:
            scores, contributions = await choice.family.predict(ref, rows, explain)
            answer = Answer(ref, _finite(scores, ref, rows), contributions, observation)
        except (InvalidInput, RunnerUnavailable):
            raise  # the client's mistake, or the runner's process: not this version's failure
        except Exception as exc:
            observation.failed("predict")
            log.warning("%s:%s failed a prediction: %s", ref.name, ref.version, exc)
            stable = (choice.route.stable if choice.route else None) or (
                choice.family.default_version
            )
            if choice.pinned or stable == ref.version:
                raise ModelUnavailable(f"model {ref.name}:{ref.version} failed: {exc}") from exc
            fallback = await choice.family.ref(stable)
            observation = Observation(fallback.name, fallback.version, started, len(rows))
            scores, contributions = await choice.family.predict(fallback, rows, explain)
            answer = Answer(fallback, _finite(scores, fallback, rows), contributions, observation)
        finally:
            if choice.route is not None and choice.route.shadows:
                self._mirror(choice, rows)
        if self.drift is not None:
            self.drift.record(answer.ref, rows)
        return answer

    def _mirror(self, choice: Choice, rows: np.ndarray) -> None:
        """Shadow versions score a copy of the request after it is answered; never returned."""
        for version in choice.route.shadows if choice.route else ():
            task = asyncio.get_running_loop().create_task(
                self._shadow(choice.family, version, rows)
            )
            self._shadow_tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, family: Family, version: str, rows: np.ndarray) -> None:
        observation = Observation(family.name, version, time.perf_counter(), len(rows))
        try:
            ref = await family.ref(version)
            scores, _ = await family.predict(ref, rows, False)
            scores = _finite(scores, ref, rows)
        except Exception:
            observation.failed("shadow")
            return
        observation.done(score_sample(scores, ref))


EXTREME = 1e18
"""No feature of a served model is this large; beyond it float32 arithmetic inside a model
overflows (weights times values past ~3.4e38), so a non-finite answer is the input's doing."""


def _finite(scores: np.ndarray, ref: ModelRef, rows: np.ndarray) -> np.ndarray:
    """Non-finite scores on ordinary input are the model's failure (recorded against the
    version); on input with values beyond `EXTREME` they are the client's, a 422 naming the
    features, so nobody can push a canary over its error threshold with huge numbers."""
    if np.isfinite(scores).all():
        return scores
    extreme = (np.abs(rows) > EXTREME).any(axis=0)  # inf included; NaN means missing, not huge
    if extreme.any():
        names = [n for n, bad in zip(ref.card.feature_names, extreme, strict=False) if bad]
        raise InvalidInput(
            f"features: {', '.join(names)} too large for the model (|value| > {EXTREME:.0e})"
        )
    raise ValueError(f"{ref.name}:{ref.version} returned non-finite scores")


def score_sample(scores: np.ndarray, ref: ModelRef) -> np.ndarray | None:
    """What `prediction_scores` records: P(positive) for binary, top-class probability otherwise."""
    if ref.card.task == "binary":
        return scores
    if ref.card.task == "multiclass":
        return scores.max(axis=1)
    return None
