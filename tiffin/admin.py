"""The admin API (seed 002's model registry, seed 003's reload, seed 004's traffic split).

Writes need a bearer JWT (`tiffin.auth`): `models:write` for the registry, deployments and
reloads, `traffic:write` for splits, shadows and A/B tests (`admin` grants both). Reads are open.
Blocking work (loading a version, waiting for every worker to switch) runs in a thread, so the
serving event loop keeps answering scoring requests meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.routing import Route

from models import importer
from tiffin import model_store
from tiffin.context import worker_of
from tiffin.errors import InvalidInput, ModelNotFound
from tiffin.http_errors import JSON, describe_errors, endpoint
from tiffin.lifecycle import stats as vm
from tiffin.lifecycle.manager import LifecycleManager, split_id
from tiffin.lifecycle.traffic import Strategy, Thresholds

REVISION = "X-Tiffin-Revision"
"""Response header: the lifecycle state revision an admin change produced."""

# BentoML's tag rules (a name or version it refuses cannot be stored): 422 naming the field.
TAG_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterRequest(_Body):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=63)
    version: str = Field(min_length=1, max_length=63)
    model_path: str | None = None
    artifact_base64: str | None = None
    filename: str | None = Field(None, description="model.onnx, model.json or model.txt")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    feature_names: list[str] | None = None
    task: str | None = None
    description: str = ""
    model_type: str | None = None
    framework: str | None = None
    tags: list[str] = Field(default_factory=list)
    performance_metrics: dict[str, float] = Field(default_factory=dict)
    reference_rows: list[list[float]] | None = Field(
        None,
        min_length=1,
        max_length=importer.REFERENCE_ROWS,
        description="training rows (or a representative sample) in feature order: the "
        "version's reference distributions for drift (`GET /drift/{model}`)",
    )

    @field_validator("name", "version")
    @classmethod
    def _storable(cls, value: str) -> str:
        if not re.fullmatch(TAG_PATTERN, value):
            raise ValueError(
                f"{value!r} is not a valid model name or version: letters, digits, '.', '_' "
                "and '-', starting and ending with a letter or digit"
            )
        return value


class DeployRequest(_Body):
    strategy: Strategy = "immediate"
    steps: list[int] | None = None
    analysis_window_s: float | None = Field(None, gt=0, le=86_400)
    thresholds: Thresholds | None = None


class ABTestStart(_Body):
    test_id: str = Field(min_length=1, max_length=64)
    model_a: str
    model_b: str
    traffic_split: float = Field(gt=0, lt=1, description="share of traffic for model_b")
    duration_hours: float = Field(24.0, gt=0, le=24 * 90)
    success_metrics: list[str] = Field(default_factory=list)


class ShadowRequest(_Body):
    versions: list[str]


def _lifecycle(request: Request) -> LifecycleManager:
    lifecycle = worker_of(request).lifecycle
    assert lifecycle is not None, "admin routes are mounted only on workers with a lifecycle"
    return lifecycle


async def _body(request: Request, model: type[BaseModel]) -> Any:
    data = _json_body(await request.body(), b"{}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # the admin API has always answered these with 422
        raise InvalidInput(describe_errors(exc.errors())) from None


def _json_body(raw: bytes, empty: bytes) -> Any:
    try:
        return json.loads(raw or empty)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"body: invalid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # 5000-digit integers, nesting past the stack
        raise InvalidInput(f"body: JSON too deep or numbers too long ({exc})") from None


def _family(request: Request) -> str:
    return request.query_params.get("model") or worker_of(request).v1_model


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


# --- registry ---------------------------------------------------------------------------------


def _register(req: RegisterRequest) -> dict[str, Any]:
    if (req.framework or "").lower() == "mlx" or (req.model_type or "").lower() == "llm":
        raise InvalidInput("framework: LLM weights are not registered here; see docs/llm.md")
    artifacts, metadata = _artifacts_from(req)
    if req.sha256 is not None:
        if len(artifacts) != 1:
            raise InvalidInput("sha256: give it with a single artifact")
        actual = model_store.sha256_bytes(next(iter(artifacts.values())))
        if actual != req.sha256.lower():
            raise InvalidInput(f"sha256: checksum mismatch, artifact has {actual}")
    metadata = {
        **metadata,
        **({"feature_names": req.feature_names} if req.feature_names else {}),
        **({"task": req.task} if req.task else {}),
        **({"framework": req.framework} if req.framework else {}),
        "description": req.description or metadata.get("description", ""),
        "metrics": {**metadata.get("metrics", {}), **req.performance_metrics},
    }
    reference = None
    if req.reference_rows is not None:
        reference = np.asarray(req.reference_rows, dtype=np.float64)
    elif req.model_path and Path(req.model_path, importer.REFERENCE_FILE).is_file():
        reference = importer.read_reference_csv(
            Path(req.model_path, importer.REFERENCE_FILE), list(metadata.get("feature_names", []))
        )
    tag = importer.import_version(req.name, req.version, artifacts, metadata, False, reference)
    return {
        "model_id": tag,
        "status": "registered",
        "tags": req.tags,
        **model_store.describe(model_store.get(req.name, req.version)),
    }


def _artifacts_from(req: RegisterRequest) -> tuple[dict[str, bytes], dict[str, Any]]:
    if req.artifact_base64 is not None:
        if req.filename not in importer.NATIVE_BY_FILE:
            raise InvalidInput(f"filename: one of {', '.join(importer.NATIVE_BY_FILE)}")
        try:
            return {req.filename: base64.b64decode(req.artifact_base64, validate=True)}, {}
        except (binascii.Error, ValueError):
            raise InvalidInput("artifact_base64: not valid base64") from None
    if not req.model_path:
        raise InvalidInput("model_path: give model_path or artifact_base64")
    path = Path(req.model_path)
    if path.is_dir():
        meta_path = path / "metadata.json"
        metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return importer._artifacts_in(path), metadata
    if path.is_file():
        if path.suffix in importer.FORBIDDEN_SUFFIXES:
            raise InvalidInput("model_path: pickle files are not an import format")
        by_suffix = {".onnx": "model.onnx", ".json": "model.json", ".txt": "model.txt"}
        if path.suffix not in by_suffix:
            raise InvalidInput("model_path: expected .onnx, .json (XGBoost) or .txt (LightGBM)")
        return {by_suffix[path.suffix]: path.read_bytes()}, {}
    raise InvalidInput(f"model_path: {req.model_path} does not exist on the server")


async def register(request: Request) -> Any:
    req = await _body(request, RegisterRequest)
    return JSON(await _thread(_register, req), status_code=201)


async def activate(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    family, version = split_id(request.path_params["model_id"])
    deployment = await _thread(lifecycle.deploy, family, version, "immediate", None, None, None)
    return {
        "model_id": f"{family}:{version}",
        "status": "active",
        "deployment": deployment.model_dump(),
    }


async def deploy(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    family, version = split_id(request.path_params["model_id"])
    req = await _body(request, DeployRequest)
    deployment = await _thread(
        lifecycle.deploy,
        family,
        version,
        req.strategy,
        req.steps,
        req.analysis_window_s,
        req.thresholds,
    )
    status = 200 if deployment.status == "completed" else 202
    return JSON(deployment.model_dump(), status_code=status)


async def reload_model(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    name = request.path_params["model"]
    state = await _thread(lifecycle.reload, name)
    # seed 003's body exactly; the lifecycle revision that carries the reload rides in a header
    return JSON({"message": f"Reloading model {name}"}, headers={REVISION: str(state.revision)})


# --- traffic ----------------------------------------------------------------------------------


async def get_split(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    family = _family(request)
    weights = lifecycle.weights(family)
    if not weights:
        raise ModelNotFound(f"model {family!r} is not in the model store")
    return weights


async def set_split(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    weights = _json_body(await request.body(), b"null")
    if not isinstance(weights, dict) or not all(
        isinstance(w, int) and not isinstance(w, bool) for w in weights.values()
    ):
        raise InvalidInput('body: expected {"<version>": <integer percent>, ...}')
    state = await _thread(lifecycle.set_weights, _family(request), weights)
    return state.families[_family(request)].weights


async def set_shadows(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    req = await _body(request, ShadowRequest)
    state = await _thread(lifecycle.set_shadows, _family(request), req.versions)
    return {"shadows": state.families[_family(request)].shadows}


async def version_metrics(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    family, version = _family(request), request.path_params["version"]
    pool = lifecycle._pool(family)
    if pool is None:
        raise ModelNotFound(f"model {family!r} is not in the model store")
    if not model_store.exists(family, version):
        raise ModelNotFound(f"version {version!r} of model {family!r} does not exist")
    # other replicas' counts come from Redis: off the event loop
    snaps = await _thread(lifecycle.stats.snapshot, family, [version])
    snap = snaps.get(version, vm.empty())
    return {
        "model": family,
        "version": version,
        "weight": lifecycle.weights(family).get(version, 0),
        "shadow": version in lifecycle.shadows(family),
        **vm.summary(snap),
    }


# --- deployments, A/B tests -------------------------------------------------------------------


async def list_deployments(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    return {"deployments": [d.model_dump() for d in reversed(lifecycle.state.deployments)]}


async def get_deployment(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    wanted = request.path_params["deployment_id"]
    found = next((d for d in lifecycle.state.deployments if d.id == wanted), None)
    if found is None:
        raise ModelNotFound(f"deployment {wanted!r} does not exist")
    return found.model_dump()


async def rollback_deployment(request: Request) -> Any:
    """Stops a canary or rolling deployment in progress: 100% back to its stable version, now.
    (`/models/{id}/activate` refuses while a deployment of the family runs.)"""
    lifecycle = _lifecycle(request)
    wanted = request.path_params["deployment_id"]
    return (await _thread(lifecycle.rollback, wanted, "rolled back by an operator")).model_dump(
        exclude={"baseline"}
    )


async def list_events(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    return {"events": [e.model_dump() for e in reversed(lifecycle.state.events)]}


async def start_ab(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    req = await _body(request, ABTestStart)
    test = await _thread(
        lifecycle.start_ab,
        req.test_id,
        req.model_a,
        req.model_b,
        req.traffic_split,
        req.duration_hours,
        req.success_metrics,
    )
    return JSON({**test.model_dump(exclude={"baseline"}), "status": test.status}, status_code=201)


async def list_ab(request: Request) -> Any:
    lifecycle = _lifecycle(request)

    def tests() -> list[dict[str, Any]]:  # results read every replica's counts from Redis
        return [
            {**t.model_dump(exclude={"baseline", "final_result"}), "result": lifecycle.ab_result(t)}
            for t in lifecycle.state.ab_tests.values()
        ]

    return {"tests": await _thread(tests)}


async def stop_ab(request: Request) -> Any:
    lifecycle = _lifecycle(request)
    test = await _thread(lifecycle.stop_ab, request.path_params["test_id"])
    return test.model_dump(exclude={"baseline"})


MODELS, TRAFFIC = "models:write", "traffic:write"
routes = [
    Route("/models/register", endpoint(register, MODELS), methods=["POST"]),
    Route("/models/{model_id}/activate", endpoint(activate, MODELS), methods=["POST"]),
    Route("/models/{model_id}/deploy", endpoint(deploy, MODELS), methods=["POST"]),
    Route("/reload/{model}", endpoint(reload_model, MODELS), methods=["POST"]),
    Route("/v1/traffic-split", endpoint(get_split), methods=["GET"]),
    Route("/v1/traffic-split", endpoint(set_split, TRAFFIC), methods=["POST"]),
    Route("/v1/shadows", endpoint(set_shadows, TRAFFIC), methods=["POST"]),
    Route("/v1/metrics/{version}", endpoint(version_metrics), methods=["GET"]),
    Route("/deployments", endpoint(list_deployments), methods=["GET"]),
    Route("/deployments/{deployment_id}", endpoint(get_deployment), methods=["GET"]),
    Route(
        "/deployments/{deployment_id}/rollback",
        endpoint(rollback_deployment, MODELS),
        methods=["POST"],
    ),
    Route("/events", endpoint(list_events), methods=["GET"]),
    Route("/ab-tests/start", endpoint(start_ab, TRAFFIC), methods=["POST"]),
    Route("/ab-tests", endpoint(list_ab), methods=["GET"]),
    Route("/ab-tests/{test_id}/stop", endpoint(stop_ab, TRAFFIC), methods=["POST"]),
]
