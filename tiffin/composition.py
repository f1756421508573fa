"""The composition root: each worker builds one `Worker` from settings and its runners.

`compose` is the only place that decides what talks to what: model families (in process or
through a runner service), the feature store, the traffic backend and `LifecycleManager`, the
router, the scoring pipelines, the LLM (in process, or forwarded to its runner), and the
metrics directory. The entry service's `__init__` calls it with the runners BentoML resolved
for it; `local_app()` (tiffin.app) calls it with runners built in this process. Nothing it
builds is kept in a module: the `Worker` is handed to the ASGI application.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from tiffin.auth import AuthSettings
from tiffin.drift import DriftRecorder, DriftSettings
from tiffin.families import Families, Family, LocalFamily, RemoteFamily, RunnerClient
from tiffin.feature_store import EmbeddedFeatureStore, FeatureStore, open_store
from tiffin.lifecycle.fleet import open_stats
from tiffin.lifecycle.manager import LifecycleManager
from tiffin.lifecycle.router import Router
from tiffin.lifecycle.traffic import TrafficSettings, open_backend
from tiffin.llm.forward import ForwardedLLM
from tiffin.llm.runtime import LLM
from tiffin.llm.settings import LLMSettings
from tiffin.logs import configure_logging
from tiffin.monitoring import Monitor
from tiffin.pipelines import Explainer, Scoring
from tiffin.settings import FeatureStoreSettings, ModelSettings, ServerSettings
from tiffin.topology import TopologySettings
from tiffin.tracing import Spans

log = logging.getLogger("tiffin.composition")
DEDICATED = (
    "card_fraud",
    "personalization",
    "fraud_detection",
    "ctr_prediction",
    "bid_optimization",
)
"""Runners that serve one family each, named after it; every other family is `generic`'s."""


@dataclass
class RunnerHealth:
    """How /health and readiness see one runner."""

    mode: str
    check: Callable[[], Any] | None = None
    """An awaitable readiness check for separate and remote runners."""


@dataclass
class Worker:
    """Everything one worker process serves with."""

    server: ServerSettings
    v1_model: str
    families: Families | None = None
    store: FeatureStore | None = None
    lifecycle: LifecycleManager | None = None
    router: Router | None = None
    scoring: Scoring | None = None
    llm: LLM | None = None
    """The LLM when it runs in this process (None when it is forwarded or absent)."""
    forwarded_llm: ForwardedLLM | None = None
    runners: dict[str, RunnerHealth] = field(default_factory=dict)
    auth: AuthSettings | None = None
    """Who may call the admin API (tabular workers only)."""
    started_at: float = field(default_factory=time.time)
    monitor: Monitor = field(default_factory=Monitor)
    """Earlier snapshots and alert start times behind `/performance/report` and `/alerts/active`."""

    async def loaded_versions(self) -> dict[str, list[dict[str, Any]]]:
        """Every loaded family's versions; a runner's answer may need a network call."""
        if self.families is None:
            return {}
        families = self.families.loaded()

        def describe() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            for name, family in families.items():
                try:
                    out[name] = family.describe()
                except Exception as exc:  # a runner that is down: /health says so
                    log.warning("cannot describe %s: %s", name, exc)
            return out

        if all(isinstance(f, LocalFamily) for f in families.values()):
            return describe()
        return await anyio.to_thread.run_sync(describe)

    async def runner_status(self) -> dict[str, dict[str, Any]]:
        async def one(health: RunnerHealth) -> dict[str, Any]:
            if health.check is None:
                return {"status": "ok", "mode": health.mode}
            try:
                ready = bool(await asyncio.wait_for(health.check(), 2.0))
            except Exception:
                ready = False
            return {"status": "ok" if ready else "down", "mode": health.mode}

        names = list(self.runners)
        results = await asyncio.gather(*(one(self.runners[n]) for n in names))
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        if self.router is not None and self.router.drift is not None:
            self.router.drift.flush()  # before the final statistics publish below
        if self.lifecycle is not None:
            self.lifecycle.stop()


def _is_local(runner: Any) -> bool:
    return not isinstance(runner, RunnerClient)


def _connect(name: str, runner: Any, timeout_s: float) -> Any:
    """A runner BentoML resolved to a remote proxy (separate or remote) becomes our own client
    for the same URL or local socket; an in-process runner instance stays as it is."""
    from _bentoml_impl.client import RemoteProxy

    if isinstance(runner, RemoteProxy):
        return RunnerClient(name, runner.to_async.url, timeout_s)
    return runner


def _family_of(runner: Any, family: str) -> Family:
    if _is_local(runner):
        return LocalFamily(runner.pool(family))
    return RemoteFamily(family, runner)


def _generic(runner: Any) -> Callable[[str], Family]:
    def make(family: str) -> Family:
        found = _family_of(runner, family)
        found.default_version  # noqa: B018 -- raises ModelNotFound for a family not in the store
        return found

    return make


def _generic_defaults(runner: Any) -> list[str]:
    if _is_local(runner):
        return list(runner.pools)
    try:
        return list(runner.call("describe"))
    except Exception as exc:  # a runner that is down: its families are looked up on first use
        log.warning("cannot list the generic runner's families: %s", exc)
        return []


def _fill_embedded(store: EmbeddedFeatureStore, entities: int) -> None:
    from models.seed_features import snapshot

    for table in snapshot(entities):
        store.write_sync(table.kind, table.ids, table.records, table.written_at)


def _wait_for_runners(runners: Mapping[str, Any], timeout_s: float) -> None:
    """Separate and remote runners start beside the entry: give them time to be ready."""
    deadline = time.monotonic() + timeout_s
    for name, runner in runners.items():
        if _is_local(runner):
            continue
        while not runner.ready_sync():
            if time.monotonic() >= deadline:
                log.warning("runner %s is not ready; starting without it", name)
                break
            time.sleep(0.5)


def compose_llm(runner: Any, settings: LLMSettings) -> tuple[LLM | None, ForwardedLLM | None]:
    """In process: the runner's LLM object. Elsewhere: its routes are forwarded."""
    if _is_local(runner):
        return runner.llm, None
    return None, ForwardedLLM(runner.async_, settings)


def compose(
    runners: Mapping[str, Any],
    server: ServerSettings,
    models: ModelSettings,
    feature_store: FeatureStoreSettings,
    traffic: TrafficSettings,
    topology: TopologySettings,
    llm_settings: LLMSettings,
    auth: AuthSettings,
) -> Worker:
    """One worker's objects from its settings and runners (instances or BentoML proxies)."""
    configure_logging(server.log_level)
    runners = {
        name: _connect(name, runner, topology.runner_timeout_s) for name, runner in runners.items()
    }
    _wait_for_runners(runners, topology.runner_startup_timeout_s)
    store = open_store(feature_store)
    if isinstance(store, EmbeddedFeatureStore):
        _fill_embedded(store, feature_store.embedded_entities)
    families = Families(
        {name: _family_of(runners[name], name) for name in DEDICATED},
        _generic(runners["generic"]),
    )
    for name in _generic_defaults(runners["generic"]):
        families.get(name)  # the generic runner's packaged families are served from the start
    backend = open_backend(feature_store.resolved_url(), traffic)
    # per-version statistics summed over every replica on the backend (tiffin/lifecycle/fleet.py)
    lifecycle = LifecycleManager(families, backend, traffic, open_stats(backend)).start()
    router = Router(families, lifecycle, DriftRecorder(DriftSettings()))
    llm, forwarded = compose_llm(runners["llm"], llm_settings)
    explainer: Explainer
    if forwarded is not None:
        explainer = forwarded.explain
    else:
        from tiffin.llm.explain import explain_fraud_or_rules

        assert llm is not None
        explainer = functools.partial(explain_fraud_or_rules, llm=llm)
    return Worker(
        server=server,
        v1_model=models.v1_model,
        families=families,
        store=store,
        lifecycle=lifecycle,
        router=router,
        scoring=Scoring(router, store, models.v1_model, explainer, Spans(server.tracing)),
        llm=llm,
        forwarded_llm=forwarded,
        runners={
            name: _runner_health(runner, topology.mode_of(name)) for name, runner in runners.items()
        },
        auth=auth,
    )


def _runner_health(runner: Any, mode: str) -> RunnerHealth:
    if _is_local(runner):
        return RunnerHealth("in-process")
    return RunnerHealth(mode, runner.ready)


def compose_llm_only(llm: LLM, server: ServerSettings) -> Worker:
    """The LLM runner served on its own (`runners.llm:LLMRunner`)."""
    configure_logging(server.log_level)
    return Worker(server=server, v1_model="", llm=llm)
