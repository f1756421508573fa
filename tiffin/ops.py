"""Operational GET endpoints (`/health`, `/ready`, `/models`, `/models/{name}`, `/v1/models`).

BentoML API methods are POST-only, so these live in a small Starlette app mounted on the entry
service. The entry service binds its live state here when a worker starts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tiffin import model_store
from tiffin.feature_store import FeatureStore


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass
class OpsState:
    started_at: float = field(default_factory=time.time)
    store: FeatureStore | None = None
    loaded_versions: Callable[[], dict[str, list[dict[str, Any]]]] | None = None
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    lifecycle: Any = None  # tiffin.lifecycle.LifecycleManager, bound by the entry service
    probes: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)


state = OpsState()


def _loaded() -> dict[str, list[dict[str, Any]]]:
    return state.loaded_versions() if state.loaded_versions else {}


async def health(_: Request) -> Response:
    loaded = _loaded()
    components: dict[str, dict[str, Any]] = {"models": {"status": "ok" if loaded else "down"}}
    if state.store is not None:
        components["feature_store"] = await state.store.status()
    if state.lifecycle is not None:
        components["traffic"] = {
            "status": "ok",
            "backend": state.lifecycle.backend.kind,
            "revision": state.lifecycle.applied_revision,
        }
    components.update(state.components)
    for name, probe in state.probes.items():
        components[name] = await probe()
    statuses = {c.get("status") for c in components.values()}
    overall = "ok" if statuses <= {"ok", "disabled"} else "degraded"
    return JSON(
        {
            "status": overall,
            "models_loaded": sum(
                1 for versions in loaded.values() for v in versions if v["state"] == "loaded"
            ),
            "uptime_seconds": round(time.time() - state.started_at, 3),
            "models": sorted(loaded),
            "components": components,
        }
    )


async def ready(_: Request) -> Response:
    loaded = _loaded()
    if not loaded:
        return JSON({"status": "not_ready", "reason": "models are still loading"}, status_code=503)
    return JSON({"status": "ready", "models": sorted(loaded)})


def _catalogue(name: str | None = None) -> dict[str, dict[str, Any]]:
    loaded = _loaded()
    out: dict[str, dict[str, Any]] = {}
    for model in model_store.tiffin_models():
        if name is not None and model.tag.name != name:
            continue
        entry = out.setdefault(model.tag.name, {"name": model.tag.name, "versions": []})
        states = {v["version"]: v for v in loaded.get(model.tag.name, [])}
        version = model.tag.version or ""
        version_state = dict(states.get(version, {"state": "available"}))
        if state.lifecycle is not None:
            weights = state.lifecycle.weights(model.tag.name)
            version_state["serving_weight"] = weights.get(version, 0)
            version_state["shadow"] = version in state.lifecycle.shadows(model.tag.name)
            failure = state.lifecycle.load_failures.get(f"{model.tag.name}:{version}")
            if failure and version_state["state"] != "loaded":
                version_state.update(state="failed", reason=failure)
            if version_state["serving_weight"] == max(weights.values(), default=0) > 0:
                entry["serving_version"] = version
        elif version_state.get("default"):
            entry["serving_version"] = version
        entry["versions"].append({**model_store.describe(model), **version_state})
    return out


async def list_models(_: Request) -> Response:
    return JSON({"models": list(_catalogue().values())})


async def get_model(request: Request) -> Response:
    name = request.path_params["name"]
    found = _catalogue(name)
    if not found:
        return JSON({"error": f"model {name!r} is not in the model store"}, status_code=404)
    return JSON(found[name])


async def v1_models(_: Request) -> Response:
    models = [
        {
            "name": entry["name"],
            "versions": [v["version"] for v in entry["versions"]],
            "serving_version": entry.get("serving_version"),
            "task": entry["versions"][0]["task"],
            "framework": entry["versions"][0]["framework"],
        }
        for entry in _catalogue().values()
    ]
    return JSON({"models": models})


async def prometheus(_: Request) -> Response:
    """Every worker's metrics (BentoML serves this itself only when its HTTP metrics are on)."""
    import os

    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/ready", ready),
        Route("/models", list_models),
        Route("/models/{name}", get_model),
        Route("/v1/models", v1_models),
        Route("/metrics", prometheus),
    ]
)
