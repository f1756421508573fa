"""Operational routes: `/health`, `/ready`, `/models`, `/models/{name}`, `/v1/models`, `/metrics`.

Handlers read the worker's objects from the request (`tiffin.context`); nothing is bound here.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Metric
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tiffin import model_store
from tiffin.composition import Worker
from tiffin.context import worker_of
from tiffin.errors import ModelNotFound
from tiffin.http_errors import JSON, endpoint
from tiffin.metrics import active_requests, exposition

HEALTHY = frozenset({"ok", "disabled"})


async def _components(worker: Worker, loaded: dict[str, Any]) -> dict[str, dict[str, Any]]:
    components: dict[str, dict[str, Any]] = {}
    if worker.families is not None:
        components["models"] = {"status": "ok" if loaded else "down"}
    if worker.store is not None:
        components["feature_store"] = await worker.store.status()
    if worker.lifecycle is not None:
        components["traffic"] = {
            "status": "ok",
            "backend": worker.lifecycle.backend.kind,
            "revision": worker.lifecycle.applied_revision,
        }
    if worker.llm is not None:
        components["llm"] = await worker.llm.health()
    elif worker.forwarded_llm is not None:
        components["llm"] = await worker.forwarded_llm.health()
    runners = await worker.runner_status()
    if any(r["mode"] != "in-process" for r in runners.values()):
        down = sorted(n for n, r in runners.items() if r["status"] != "ok")
        components["runners"] = {
            "status": "down" if down else "ok",
            **({"down": down} if down else {}),
            "runners": runners,
        }
    return components


async def health(request: Request) -> dict[str, Any]:
    worker = worker_of(request)
    loaded = await worker.loaded_versions()
    components = await _components(worker, loaded)
    statuses = {c.get("status") for c in components.values()}
    return {
        "status": "ok" if statuses <= HEALTHY else "degraded",
        "models_loaded": sum(
            1 for versions in loaded.values() for v in versions if v["state"] == "loaded"
        ),
        "uptime_seconds": round(time.time() - worker.started_at, 3),
        "models": sorted(loaded),
        "components": components,
    }


def health_score(components: dict[str, dict[str, Any]]) -> float:
    """Seed 002's `ml_inference_health_score`: the share of the components `/health` reports
    (models, feature_store, traffic, llm, runners) whose status is ok or disabled. 1.0 exactly
    when `/health` says ok (also with no components), 0.0 when every component is down."""
    if not components:
        return 1.0
    return sum(c.get("status") in HEALTHY for c in components.values()) / len(components)


async def health_family(worker: Worker) -> Metric:
    score = health_score(await _components(worker, await worker.loaded_versions()))
    family = Metric(
        "ml_inference_health_score",
        "Share of the components /health reports that are ok or disabled (seed 002): 1 when "
        "/health says ok, 0 when every component is down; from the worker answering the scrape",
        "gauge",
    )
    family.add_sample("ml_inference_health_score", {}, score)
    return family


async def not_ready(worker: Worker) -> str | None:
    """Why this worker must not get traffic yet, or None when it is ready."""
    if worker.families is None:  # the LLM runner on its own
        llm = worker.llm
        if llm is not None and llm.engine is None and not llm.disabled:
            return llm.unavailable_reason
        return None
    loaded = await worker.loaded_versions()
    if not loaded:
        return "models are still loading"
    failed = [
        f"{name}:{row['version']} failed to load: {row.get('reason')}"
        for name, rows in loaded.items()
        for row in rows
        if row["state"] == "failed" and row["version"] == _default(worker, name)
    ]
    if failed:
        return "; ".join(failed)
    runners = await worker.runner_status()
    down = sorted(name for name, status in runners.items() if status["status"] != "ok")
    if down:
        return f"runner {', '.join(down)} is not ready"
    return None


def _default(worker: Worker, family: str) -> str | None:
    assert worker.families is not None
    found = worker.families.find(family)
    try:
        return found.default_version if found is not None else None
    except Exception:  # a runner that is down has no answer; readiness reports the runner
        return None


async def ready(request: Request) -> Response:
    worker = worker_of(request)
    reason = await not_ready(worker)
    if reason is not None:
        return JSON({"status": "not_ready", "reason": reason}, status_code=503)
    if worker.families is None:
        llm = worker.llm
        return JSON(
            {
                "status": "ready",
                "model": llm.model_id if llm else None,
                "engine": llm.engine_kind if llm else None,
            }
        )
    return JSON({"status": "ready", "models": sorted(await worker.loaded_versions())})


async def catalogue(worker: Worker, name: str | None = None) -> dict[str, dict[str, Any]]:
    loaded = await worker.loaded_versions()
    lifecycle = worker.lifecycle
    out: dict[str, dict[str, Any]] = {}
    for model in model_store.tiffin_models():
        if name is not None and model.tag.name != name:
            continue
        entry = out.setdefault(model.tag.name, {"name": model.tag.name, "versions": []})
        states = {v["version"]: v for v in loaded.get(model.tag.name, [])}
        version = model.tag.version or ""
        version_state = dict(states.get(version, {"state": "available"}))
        if lifecycle is not None:
            weights = lifecycle.weights(model.tag.name)
            version_state["serving_weight"] = weights.get(version, 0)
            version_state["shadow"] = version in lifecycle.shadows(model.tag.name)
            failure = lifecycle.load_failures.get(f"{model.tag.name}:{version}")
            if failure and version_state["state"] != "loaded":
                version_state.update(state="failed", reason=failure)
            if version_state["serving_weight"] == max(weights.values(), default=0) > 0:
                entry["serving_version"] = version
        elif version_state.get("default"):
            entry["serving_version"] = version
        entry["versions"].append({**model_store.describe(model), **version_state})
    return out


async def list_models(request: Request) -> dict[str, Any]:
    return {"models": list((await catalogue(worker_of(request))).values())}


async def get_model(request: Request) -> dict[str, Any]:
    name = request.path_params["name"]
    found = await catalogue(worker_of(request), name)
    if not found:
        raise ModelNotFound(f"model {name!r} is not in the model store")
    return found[name]


async def v1_models(request: Request) -> dict[str, Any]:
    models = [
        {
            "name": entry["name"],
            "versions": [v["version"] for v in entry["versions"]],
            "serving_version": entry.get("serving_version"),
            "task": entry["versions"][0]["task"],
            "framework": entry["versions"][0]["framework"],
        }
        for entry in (await catalogue(worker_of(request))).values()
    ]
    return {"models": models}


async def prometheus(request: Request) -> Response:
    """Every worker's metrics of this server (BentoML serves this itself only when its HTTP
    metrics are on), with the seeds' derived names (`tiffin.metrics.seed_aliases`) and seed 002's
    health score. Drift PSI gauges are recomputed first, so an alert on them is as fresh as the
    scrape."""
    import anyio

    from tiffin.drift_routes import refresh_gauges

    worker = worker_of(request)
    await anyio.to_thread.run_sync(refresh_gauges, worker)
    active_requests()  # present (0) before this worker's first request
    body, media_type = exposition([await health_family(worker)])
    return Response(body, media_type=media_type)


async def _health(request: Request) -> Response:
    return JSON(await health(request))


routes = [
    Route("/health", _health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/models", endpoint(list_models), methods=["GET"]),
    Route("/models/{name}", endpoint(get_model), methods=["GET"]),
    Route("/v1/models", endpoint(v1_models), methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
]
"""Routes every tabular worker serves."""

llm_only_routes = [
    Route("/health", _health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
]
"""Routes the LLM runner serves on its own."""
