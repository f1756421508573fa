"""`GET /drift/{model}[?version=]`: live PSI per feature and for the score, over every replica.

The live counts are the fleet-wide per-version snapshot the lifecycle statistics already sum
(`tiffin.lifecycle.fleet`); the reference is the version's `ModelCard.reference`. Reading it
also sets `ml_feature_drift_psi`, and so does every `/metrics` scrape (`refresh_gauges`), so the
alert rule sees fresh values without anyone calling `/drift`.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from starlette.requests import Request
from starlette.routing import Route

from tiffin import model_store
from tiffin.composition import Worker
from tiffin.context import worker_of
from tiffin.drift import DriftSettings, report
from tiffin.errors import ModelNotFound
from tiffin.http_errors import endpoint

log = logging.getLogger("tiffin.drift")


def _settings(worker: Worker) -> DriftSettings:
    drift = worker.router.drift if worker.router is not None else None
    return drift.settings if drift is not None else DriftSettings()


def drift_of(
    worker: Worker, name: str, version: str | None = None, listed: list[Any] | None = None
) -> dict[str, Any]:
    """Every stored version of `name` (or only `version`) judged against its reference;
    `listed`: the model store's versions when the caller already has them."""
    every = model_store.tiffin_models() if listed is None else listed
    stored = [m for m in every if m.tag.name == name]
    if not stored:
        raise ModelNotFound(f"model: {name!r} is not in the model store")
    if version is not None:
        stored = [m for m in stored if m.tag.version == version]
        if not stored:
            raise ModelNotFound(f"version: {version!r} of model {name!r} is not in the model store")
    versions = [str(m.tag.version) for m in stored]
    assert worker.lifecycle is not None
    snaps = worker.lifecycle.stats.snapshot(name, versions)
    settings = _settings(worker)
    return {
        "model": name,
        "threshold": settings.threshold,
        "min_samples": settings.min_samples,
        "versions": [
            report(
                name,
                str(m.tag.version),
                model_store.card_of(m).reference,
                snaps.get(str(m.tag.version)),
                settings,
            )
            for m in stored
        ],
    }


async def drift(request: Request) -> dict[str, Any]:
    worker = worker_of(request)
    name = request.path_params["model"]
    version = request.query_params.get("version") or None
    # the snapshot may read Redis and the model store reads disk: off the event loop
    return await anyio.to_thread.run_sync(drift_of, worker, name, version)


def refresh_gauges(worker: Worker) -> None:
    """Recompute `ml_feature_drift_psi` for every loaded model (before a `/metrics` scrape)."""
    if worker.families is None or worker.lifecycle is None:
        return
    listed = model_store.tiffin_models()  # once per scrape, not once per model
    for name in worker.families.loaded():
        try:
            drift_of(worker, name, listed=listed)
        except Exception as exc:  # a scrape must still answer; the gauge keeps its last value
            log.warning("drift of %s not refreshed: %s", name, exc)


routes = [Route("/drift/{model}", endpoint(drift), methods=["GET"])]
