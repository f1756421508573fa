"""The API every tabular runner service shares; a runner file only declares its model.

`@bentoml.service` collects API methods from base classes, so each runner is a three-line
subclass with its packaged model at class scope (which is what makes `bentoml build` ship it).
In the in-process topology the entry service calls `pool(family)` directly; in the separate and
remote topologies it calls these APIs through BentoML's client (`tiffin.families.RemoteFamily`),
and `predict` is where BentoML's adaptive batching merges concurrent requests.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import bentoml
import numpy as np

from tiffin import model_store
from tiffin.errors import ModelNotFound
from tiffin.families import Job, JobResult, predict_local
from tiffin.metrics import exposition
from tiffin.model_pool import ModelPool
from tiffin.replica import MetricsSettings, use_own_metrics_dir
from tiffin.settings import server_settings


def runner_service_config() -> dict[str, Any]:
    """What every runner's `@bentoml.service` shares: one process each; BentoML's per-request
    access log and spans on or off as for the entry (they cost more CPU than a prediction does;
    docs/benchmarks.md). A runner served on its own (`bentoml serve runners.x:Svc`) gets its own
    Prometheus directory like the entry (tiffin/replica.py), and `RunnerMetrics` serves it."""
    use_own_metrics_dir(MetricsSettings())
    server = server_settings()
    return {
        "workers": 1,
        "traffic": {"timeout": 60, "max_concurrency": 1024},
        "logging": {"access": {"enabled": server.access_log}},
        "metrics": {"enabled": server.http_metrics},
        "tracing": {} if server.tracing else {"excluded_urls": ["."]},
    }


class TabularRunner:
    model: ClassVar[Any]  # a bentoml.models.BentoModel declared by each runner

    def __init__(self) -> None:
        pool = ModelPool.for_declared(self.model.tag)
        self.pools: dict[str, ModelPool] = {pool.family: pool}

    def pool(self, family: str) -> ModelPool:
        found = self.pools.get(family)
        if found is None:
            raise ModelNotFound(f"model {family!r} is not served by this runner")
        return found

    # Rows of many concurrent requests arrive as one list of jobs; each (family, version,
    # explain) group is one model call, and BentoML splits the answers back per caller.
    # BentoML's batcher answers 503 to a request it predicts will wait past `max_latency_ms`,
    # from estimates that a CPU stall inflates: at 1 s a busy 2-core box shed requests. 10 s is
    # the entry's own patience (`TIFFIN_RUNNER_TIMEOUT_S`); waiting longer serves nobody.
    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=256, max_latency_ms=10_000)
    def predict(self, jobs: list[Job]) -> list[JobResult]:
        groups: dict[tuple[str, str | None, bool], list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            groups[(job.family, job.version, job.explain)].append(index)
        results: list[JobResult | None] = [None] * len(jobs)
        for (family, version, explain), members in groups.items():
            model = self.pool(family).get(version)
            sizes = [len(jobs[i].rows) for i in members]
            rows = np.asarray([row for i in members for row in jobs[i].rows], dtype=np.float32)
            self.pool(family).check_width(model, rows)
            scores, contributions = predict_local(model, rows, explain)
            start = 0
            for i, size in zip(members, sizes, strict=True):
                part = slice(start, start + size)
                start += size
                results[i] = JobResult(
                    version=model.version,
                    scores=scores[part].tolist(),
                    contributions=None if contributions is None else contributions[part].tolist(),
                )
        return [r for r in results if r is not None]

    @bentoml.api
    def card(self, family: str, version: str | None = None) -> dict[str, Any]:
        model = self.pool(family).get(version)
        return {"version": model.version, "card": model.card.model_dump(mode="json")}

    @bentoml.api
    def default_version(self, family: str) -> str:
        return self.pool(family).default_version

    @bentoml.api
    def load(self, family: str, version: str) -> list[dict[str, Any]]:
        """Load and warm a version before traffic is routed to it (raises when it cannot)."""
        pool = self.pool(family)
        pool.load(version)
        return pool.describe()

    @bentoml.api
    def reload(self, family: str) -> list[dict[str, Any]]:
        pool = self.pool(family)
        pool.reload_loaded()
        return pool.describe()

    @bentoml.api
    def describe(self) -> dict[str, list[dict[str, Any]]]:
        return {family: pool.describe() for family, pool in self.pools.items()}


class MultiFamilyRunner(TabularRunner):
    """A runner for every family without a dedicated runner: any Tiffin model in the store."""

    def __init__(self) -> None:
        self.pools = {}
        for declared in self.declared():
            self.pool(declared.tag.name, declared.tag.version)

    def declared(self) -> list[Any]:
        return []

    def pool(self, family: str, default_version: str | None = None) -> ModelPool:
        found = self.pools.get(family)
        if found is None:
            version = default_version or model_store.get(family).tag.version or "latest"
            found = ModelPool(family, version)
            found.load(version)
            # Assignment is atomic: two first uses at once load the default twice at worst.
            self.pools.setdefault(family, found)
        return self.pools[family]


class RunnerMetrics:
    """`GET /metrics` of a runner service: its workers' Tiffin metrics (model loads, the
    predictions it served), read from its own multiprocess directory, as the entry's `/metrics`
    does. BentoML's own endpoint reads the directory BentoML configured, not the replica's."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics" and scope["method"] == "GET":
            from starlette.responses import Response

            body, media_type = exposition()
            await Response(body, media_type=media_type)(scope, receive, send)
            return
        await self.app(scope, receive, send)
