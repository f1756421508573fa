"""Model lifecycle inside the service: traffic splits, hot swaps, canaries, A/B tests, shadows.

Each worker runs one `LifecycleManager`. A background thread polls the shared traffic state
(`tiffin.lifecycle.traffic`), loads and warms any version the state routes to *before* routing
to it, swaps the worker's routing table atomically and acknowledges the revision. One worker at
a time holds the leader lease and drives time-based work: canary steps, automatic rollback, A/B
expiry. Admin calls change the state with compare-and-set and wait until every live worker has
acknowledged, so "done" means done everywhere.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tiffin.errors import Conflict, InvalidInput, ModelLoadError, ModelNotFound
from tiffin.families import Families, Family
from tiffin.lifecycle import stats as vm
from tiffin.lifecycle.fleet import LocalStats, VersionStats
from tiffin.lifecycle.traffic import (
    ABTest,
    Deployment,
    StateBackend,
    Thresholds,
    TrafficSettings,
    TrafficState,
    Transition,
    validate_weights,
)

log = logging.getLogger("tiffin.lifecycle")
DEFAULT_STEPS = {"canary": [10, 25, 50, 100], "rolling": [20, 40, 60, 80, 100]}
DEFAULT_WINDOW_S = {"canary": 30.0, "rolling": 10.0}


@dataclass(frozen=True)
class Route:
    weights: dict[str, int]
    shadows: tuple[str, ...] = ()
    stable: str | None = None


@dataclass
class LifecycleManager:
    families: Families
    backend: StateBackend
    settings: TrafficSettings
    stats: VersionStats = field(default_factory=LocalStats)
    worker_id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:6]}")
    routes: dict[str, Route] = field(default_factory=dict)
    state: TrafficState = field(default_factory=TrafficState)
    applied_revision: int = -1
    load_failures: dict[str, str] = field(default_factory=dict)
    _reload_tokens: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    # refresh runs on the background thread and in admin calls (wait_for_acks): unserialized, an
    # older revision applied last would win and be acknowledged
    _refresh_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the worker loop ----------------------------------------------------------------------

    def start(self) -> LifecycleManager:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="tiffin-lifecycle", daemon=True)
        self._thread.start()
        self.stats.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.stats.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.refresh()
                if self.backend.try_lead(self.worker_id, self.settings.ack_ttl_s):
                    self.control()
            except Exception:  # the loop must survive Redis blips; the next tick retries
                log.exception("lifecycle tick failed")

    def refresh(self) -> None:
        with self._refresh_lock:
            if self.backend.revision() != self.applied_revision:
                self._apply(self.backend.load())
            self.backend.ack(self.worker_id, self.applied_revision)

    def _apply(self, state: TrafficState) -> None:
        routes: dict[str, Route] = {}
        for family, traffic in state.families.items():
            pool = self._pool(family)
            if pool is None:
                continue
            if traffic.reload_token != self._reload_tokens.get(family, 0):
                self._reload_tokens[family] = traffic.reload_token
                pool.reload_loaded()
            ready = {
                v for v in {*traffic.weights, *traffic.shadows} if self._ensure_loaded(pool, v)
            }
            weights = {v: w for v, w in traffic.weights.items() if v in ready and w > 0}
            lost = sum(w for v, w in traffic.weights.items() if v not in ready)
            if weights and lost:  # a version this worker cannot load: its share goes to the biggest
                top = max(weights, key=lambda v: weights[v])
                weights[top] += lost
            if weights:
                deployment = state.active_deployment(family)
                stable = (
                    deployment.stable_version
                    if deployment
                    else max(weights, key=lambda v: weights[v])
                )
                shadows = tuple(v for v in traffic.shadows if v in ready)
                routes[family] = Route(weights, shadows, stable)
        self.routes = routes
        self.state = state
        self.applied_revision = state.revision

    def _pool(self, family: str) -> Family | None:
        return self.families.find(family)

    def _ensure_loaded(self, pool: Family, version: str) -> bool:
        try:
            pool.load(version)
            return True
        except (ModelLoadError, ModelNotFound) as exc:
            self.load_failures[f"{pool.name}:{version}"] = str(exc)
            return False

    # --- the request path ---------------------------------------------------------------------

    def route(self, family: str) -> Route | None:
        """The family's current route (weights, stable, shadows); `tiffin.lifecycle.router`
        turns it into a version per request."""
        return self.routes.get(family)

    def stable(self, family: str) -> str | None:
        route = self.routes.get(family)
        return route.stable if route else None

    def shadows(self, family: str) -> tuple[str, ...]:
        route = self.routes.get(family)
        return route.shadows if route else ()

    def weights(self, family: str) -> dict[str, int]:
        route = self.routes.get(family)
        if route is not None:
            return dict(route.weights)
        pool = self._pool(family)
        return {pool.default_version: 100} if pool else {}

    # --- admin operations (called off the event loop) -----------------------------------------

    def _require_versions(self, family: str, versions: list[str]) -> Family:
        pool = self._pool(family)
        if pool is None:
            raise ModelNotFound(f"model {family!r} is not in the model store")
        for version in versions:
            try:
                pool.load(version)  # loads and warms here first: a bad version changes nothing
            except ModelNotFound:
                raise InvalidInput(
                    f"weights: version {version!r} of {family!r} does not exist"
                ) from None
            except ModelLoadError as exc:
                raise InvalidInput(f"{family}:{version} cannot be served: {exc}") from None
        return pool

    def commit(self, mutate: Callable[[TrafficState], Any]) -> tuple[TrafficState, Any]:
        state, result = self.backend.update(mutate)
        self.wait_for_acks(state.revision)
        return state, result

    def wait_for_acks(self, revision: int) -> None:
        deadline = time.monotonic() + self.settings.switch_timeout_s
        while time.monotonic() < deadline:
            self.refresh()
            acks = self.backend.acks()
            if acks and all(r >= revision for r in acks.values()):
                return
            time.sleep(self.settings.poll_interval_s / 2)
        lagging = {w: r for w, r in self.backend.acks().items() if r < revision}
        raise Conflict(f"revision {revision} committed but not yet applied by workers {lagging}")

    def set_weights(self, family: str, weights: dict[str, int]) -> TrafficState:
        if (problem := validate_weights(weights)) is not None:
            raise InvalidInput(problem)
        self._require_versions(family, list(weights))

        def mutate(state: TrafficState) -> None:
            if state.active_deployment(family):
                raise Conflict(f"a deployment of {family!r} is in progress")
            state.family(family).weights = dict(weights)
            state.log("traffic_split", family=family, weights=weights)

        return self.commit(mutate)[0]

    def set_shadows(self, family: str, versions: list[str]) -> TrafficState:
        self._require_versions(family, versions)

        def mutate(state: TrafficState) -> None:
            state.family(family).shadows = list(versions)
            state.log("shadows", family=family, versions=versions)

        return self.commit(mutate)[0]

    def reload(self, family: str) -> TrafficState:
        if self._pool(family) is None:
            raise ModelNotFound(f"model {family!r} is not in the model store")

        def mutate(state: TrafficState) -> None:
            state.family(family).reload_token += 1
            state.log("reload", family=family)

        return self.commit(mutate)[0]

    def deploy(
        self,
        family: str,
        version: str,
        strategy: str,
        steps: list[int] | None,
        window_s: float | None,
        thresholds: Thresholds | None,
    ) -> Deployment:
        pool = self._require_versions(family, [version])
        stable = self.stable(family) or pool.default_version
        if strategy in DEFAULT_STEPS:
            steps = steps or DEFAULT_STEPS[strategy]
            if any(not 0 < s <= 100 for s in steps) or steps != sorted(steps) or steps[-1] != 100:
                raise InvalidInput("steps: increasing percentages in (0, 100], ending at 100")
        deployment = Deployment(
            id=uuid.uuid4().hex[:12],
            family=family,
            strategy=strategy,
            target_version=version,
            stable_version=stable,
            steps=steps or [100],
            window_s=window_s or DEFAULT_WINDOW_S.get(strategy, 0.0),
            thresholds=thresholds or Thresholds(),
        )
        if strategy == "rolling":  # rolling gates on errors only
            deployment.thresholds = deployment.thresholds.model_copy(
                update={"max_p99_ms": None, "max_score_psi": None}
            )

        def start(state: TrafficState) -> None:
            if state.active_deployment(family):
                raise Conflict(f"a deployment of {family!r} is already in progress")
            traffic = state.family(family)
            if strategy == "blue-green":  # warm green everywhere on mirrored traffic first
                traffic.shadows = sorted({*traffic.shadows, version})
                deployment.transitions.append(Transition(event="green_warming"))
            elif strategy in DEFAULT_STEPS:
                first = deployment.steps[0]
                traffic.weights = (
                    {stable: 100 - first, version: first} if first < 100 else {version: 100}
                )
                deployment.baseline = self.stats.snapshot(family, [stable, version], fresh=True)
                deployment.transitions.append(Transition(event="step", detail={"weight": first}))
            state.deployments.append(deployment)
            del state.deployments[:-100]
            state.log(
                "deploy_started",
                family=family,
                id=deployment.id,
                strategy=strategy,
                version=version,
                stable=stable,
            )

        self.commit(start)
        if strategy in ("immediate", "blue-green"):
            return self._finish_switch(deployment)
        return deployment

    def _finish_switch(self, deployment: Deployment) -> Deployment:
        def flip(state: TrafficState) -> Deployment:
            traffic = state.family(deployment.family)
            traffic.weights = {deployment.target_version: 100}
            traffic.shadows = [v for v in traffic.shadows if v != deployment.target_version]
            current = self._find(state, deployment.id)
            current.status = "completed"
            current.transitions.append(Transition(event="switched"))
            state.log(
                "deploy_completed",
                family=deployment.family,
                id=deployment.id,
                version=deployment.target_version,
            )
            return current

        return self.commit(flip)[1]

    @staticmethod
    def _find(state: TrafficState, deployment_id: str) -> Deployment:
        return next(d for d in state.deployments if d.id == deployment_id)

    # --- leader duties: canary analysis and A/B expiry ----------------------------------------

    def control(self) -> None:
        state = self.state
        for deployment in state.deployments:
            if deployment.status == "in_progress" and deployment.strategy in DEFAULT_STEPS:
                self._analyse(deployment)
        for test in state.ab_tests.values():
            if (
                test.status == "running"
                and time.time() >= test.started_at + test.duration_hours * 3600
            ):
                self.stop_ab(test.test_id, reason="duration elapsed", wait=False)

    def _analyse(self, deployment: Deployment) -> None:
        family, target, stable = (
            deployment.family,
            deployment.target_version,
            deployment.stable_version,
        )
        now = self.stats.snapshot(family, [target, stable])
        canary = vm.delta(now.get(target, vm.empty()), deployment.baseline.get(target))
        base = vm.delta(now.get(stable, vm.empty()), deployment.baseline.get(stable))
        verdict = breach(canary, base, deployment.thresholds)
        if verdict:
            self._transition(deployment.id, rollback=verdict, stats=vm.summary(canary))
            return
        window_over = time.time() - deployment.step_started_at >= deployment.window_s
        enough = canary["ok"] + canary["error"] >= deployment.thresholds.min_samples
        if window_over and enough:
            self._transition(deployment.id, rollback=None, stats=vm.summary(canary))

    def rollback(self, deployment_id: str, reason: str) -> Deployment:
        """Rolls a deployment in progress back to its stable version and waits for every worker."""
        found = next((d for d in self.backend.load().deployments if d.id == deployment_id), None)
        if found is None:
            raise ModelNotFound(f"deployment {deployment_id!r} does not exist")
        if found.status != "in_progress":
            raise Conflict(f"deployment {deployment_id!r} is {found.status}, not in progress")
        self._transition(deployment_id, rollback=reason, stats={})
        self.wait_for_acks(self.backend.revision())
        return self._find(self.state, deployment_id)

    def _transition(self, deployment_id: str, rollback: str | None, stats: dict[str, Any]) -> None:
        def mutate(state: TrafficState) -> None:
            d = self._find(state, deployment_id)
            if d.status != "in_progress":
                return
            traffic = state.family(d.family)
            if rollback:
                traffic.weights = {d.stable_version: 100}
                d.status, d.reason = "rolled_back", rollback
                d.transitions.append(
                    Transition(event="rolled_back", detail={"reason": rollback, **stats})
                )
                state.log("deploy_rolled_back", family=d.family, id=d.id, reason=rollback)
                return
            d.step_index += 1
            if d.step_index >= len(d.steps):
                traffic.weights = {d.target_version: 100}
                d.status = "completed"
                d.transitions.append(Transition(event="completed", detail=stats))
                state.log("deploy_completed", family=d.family, id=d.id, version=d.target_version)
                return
            weight = d.steps[d.step_index]
            traffic.weights = (
                {d.stable_version: 100 - weight, d.target_version: weight}
                if weight < 100
                else {d.target_version: 100}
            )
            d.step_started_at = time.time()
            d.baseline = self.stats.snapshot(
                d.family, [d.stable_version, d.target_version], fresh=True
            )
            d.transitions.append(Transition(event="step", detail={"weight": weight, **stats}))
            state.log("deploy_step", family=d.family, id=d.id, weight=weight)

        self.backend.update(mutate)

    # --- A/B tests ----------------------------------------------------------------------------

    def start_ab(
        self,
        test_id: str,
        model_a: str,
        model_b: str,
        split: float,
        duration_hours: float,
        success_metrics: list[str],
    ) -> ABTest:
        (family, version_a), (family_b, version_b) = split_id(model_a), split_id(model_b)
        if family != family_b:
            raise InvalidInput(f"model_b: must be a version of {family!r}, got {family_b!r}")
        if version_a == version_b:
            raise InvalidInput("model_b: must differ from model_a")
        self._require_versions(family, [version_a, version_b])
        share_b = round(split * 100)
        if not 0 < share_b < 100:
            raise InvalidInput("traffic_split: the share of model_b must be between 0.01 and 0.99")
        test = ABTest(
            test_id=test_id,
            family=family,
            model_a=model_a,
            model_b=model_b,
            traffic_split=split,
            duration_hours=duration_hours,
            success_metrics=success_metrics,
        )

        def mutate(state: TrafficState) -> None:
            if test_id in state.ab_tests and state.ab_tests[test_id].status == "running":
                raise Conflict(f"A/B test {test_id!r} is already running")
            if state.active_deployment(family) or any(
                t.family == family and t.status == "running" for t in state.ab_tests.values()
            ):
                raise Conflict(f"{family!r} already has a deployment or A/B test in progress")
            traffic = state.family(family)
            test.previous_weights = dict(traffic.weights) or self.weights(family)
            traffic.weights = {version_a: 100 - share_b, version_b: share_b}
            test.baseline = self.stats.snapshot(family, [version_a, version_b], fresh=True)
            state.ab_tests[test_id] = test
            state.log("ab_test_started", test_id=test_id, family=family)

        self.commit(mutate)
        return test

    def ab_result(self, test: ABTest, fresh: bool = False) -> dict[str, Any]:
        if test.final_result is not None:
            return test.final_result
        (family, a), (_, b) = split_id(test.model_a), split_id(test.model_b)
        now = self.stats.snapshot(family, [a, b], fresh)
        arm_a = vm.delta(now.get(a, vm.empty()), test.baseline.get(a))
        arm_b = vm.delta(now.get(b, vm.empty()), test.baseline.get(b))
        from tiffin.lifecycle.ab_stats import compare

        return compare(arm_a, arm_b, test.success_metrics)

    def stop_ab(self, test_id: str, reason: str = "stopped", wait: bool = True) -> ABTest:
        current = self.state.ab_tests.get(test_id) or self.backend.load().ab_tests.get(test_id)
        if current is None:
            raise ModelNotFound(f"A/B test {test_id!r} does not exist")
        result = self.ab_result(current, fresh=True)

        def mutate(state: TrafficState) -> ABTest:
            test = state.ab_tests[test_id]
            if test.status != "running":
                return test
            test.status = "completed" if reason == "duration elapsed" else "stopped"
            test.stopped_at = time.time()
            test.final_result = {**result, "reason": reason}
            state.family(test.family).weights = test.previous_weights
            state.log("ab_test_stopped", test_id=test_id, reason=reason)
            return test

        if wait:
            return self.commit(mutate)[1]
        return self.backend.update(mutate)[1]


def split_id(model_id: str) -> tuple[str, str]:
    """`name:version` -> (name, version); 422 naming the id when it has no version."""
    name, sep, version = model_id.partition(":")
    if not sep or not name or not version:
        raise InvalidInput(f"model id {model_id!r}: expected 'name:version'")
    return name, version


def breach(canary: vm.Snapshot, stable: vm.Snapshot, limits: Thresholds) -> str | None:
    """Why the canary must be rolled back, or None while it stays within every threshold."""
    requests = canary["ok"] + canary["error"]
    if requests < limits.min_samples:
        return None
    error_rate = canary["error"] / requests
    if error_rate > limits.max_error_rate:
        return f"error rate {error_rate:.2%} > {limits.max_error_rate:.2%}"
    p99 = vm.p99_ms(canary)
    stable_p99 = vm.p99_ms(stable)
    if (
        limits.max_p99_ms is not None
        and p99 is not None
        and p99 > limits.max_p99_ms
        and (stable_p99 is None or p99 > limits.max_p99_ratio * stable_p99)
    ):
        return f"p99 latency {p99:.1f} ms > {limits.max_p99_ms:.1f} ms"
    scored = min(stable["score_count"], canary["score_count"]) >= limits.min_samples
    if limits.max_score_psi is not None and scored:
        shift = vm.psi(canary, stable)
        if shift is not None and shift > limits.max_score_psi:
            return f"score distribution shift PSI {shift:.3f} > {limits.max_score_psi}"
    return None
