"""Every endpoint once, as a `Call`: method, path, body and how to read the answer.

Both clients are built from these builders (`tiffin.client.clients`), so the sync and async
interfaces, their signatures and their answers cannot drift apart.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter

from tiffin.client import models as m
from tiffin.lifecycle.traffic import Strategy, Thresholds
from tiffin.schemas import (
    AdFraudResponse,
    BatchResponse,
    BidResponse,
    CardFraudResponse,
    CtrResponse,
    GenericPredictResponse,
    PersonalizationResponse,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    params: Mapping[str, str] | None = None
    text: bool = False
    """The answer is text (Prometheus), not JSON."""
    answers: frozenset[int] = field(default_factory=lambda: frozenset({200, 201, 202}))
    """Statuses that are answers rather than errors (`/ready` answers 503 while loading)."""
    retry_statuses: frozenset[int] = frozenset({429, 503})


def _model(cls: type[T]) -> Callable[[Any], T]:
    adapter = TypeAdapter(cls)
    return adapter.validate_python


def _body(**fields: Any) -> dict[str, Any]:
    """JSON body without the optional fields left unset (the seeds' bodies omit them)."""
    return {k: v for k, v in fields.items() if v is not None}


def _plain(item: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    return item.model_dump(exclude_none=True) if isinstance(item, BaseModel) else dict(item)


def _seg(value: str) -> str:
    return quote(value, safe=":")


def _family(model: str | None) -> dict[str, str] | None:
    return {"model": model} if model else None


# --- seed 000 ---------------------------------------------------------------------------------


def predict_fraud(
    user_id: str, ip_address: str, impressions_24h: int, clicks_24h: int, user_agent: str = ""
) -> Call[AdFraudResponse]:
    """`POST /predict/fraud`: ad-click fraud probability."""
    body = _body(
        user_id=user_id,
        ip_address=ip_address,
        user_agent=user_agent,
        impressions_24h=impressions_24h,
        clicks_24h=clicks_24h,
    )
    return Call("POST", "/predict/fraud", _model(AdFraudResponse), body)


def predict_ctr(
    placement_id: str,
    ad_format: str,
    time_of_day: int,
    day_of_week: int,
    user_segments: Sequence[str] = (),
) -> Call[CtrResponse]:
    """`POST /predict/ctr`: click-through rate."""
    body = _body(
        placement_id=placement_id,
        ad_format=ad_format,
        user_segments=list(user_segments),
        time_of_day=time_of_day,
        day_of_week=day_of_week,
    )
    return Call("POST", "/predict/ctr", _model(CtrResponse), body)


def predict_bid(
    placement_id: str,
    floor_cpm: float,
    predicted_ctr: float,
    competition_level: str,
    budget_remaining: float,
) -> Call[BidResponse]:
    """`POST /predict/bid`: recommended bid CPM."""
    body = _body(
        placement_id=placement_id,
        floor_cpm=floor_cpm,
        predicted_ctr=predicted_ctr,
        competition_level=competition_level,
        budget_remaining=budget_remaining,
    )
    return Call("POST", "/predict/bid", _model(BidResponse), body)


# --- seed 001 ---------------------------------------------------------------------------------


def score_fraud(
    card_id: str,
    transaction_amount: float,
    merchant_id: str | None = None,
    mcc_code: str | None = None,
    country_code: str | None = None,
    llm_explanation: bool = False,
) -> Call[CardFraudResponse]:
    """`POST /score/fraud`: card transaction fraud score with risk factors."""
    body = _body(
        card_id=card_id,
        transaction_amount=transaction_amount,
        merchant_id=merchant_id,
        mcc_code=mcc_code,
        country_code=country_code,
        llm_explanation=llm_explanation or None,
    )
    return Call("POST", "/score/fraud", _model(CardFraudResponse), body)


def score_personalization(
    user_id: str,
    item_id: str,
    item_category: str | None = None,
    item_price: float | None = None,
    session_id: str | None = None,
) -> Call[PersonalizationResponse]:
    """`POST /score/personalization`: relevance, conversion and engagement."""
    body = _body(
        user_id=user_id,
        item_id=item_id,
        item_category=item_category,
        item_price=item_price,
        session_id=session_id,
    )
    return Call("POST", "/score/personalization", _model(PersonalizationResponse), body)


def score_batch(
    model_type: str,
    requests: Sequence[Mapping[str, Any] | BaseModel],
    batch_id: str | None = None,
) -> Call[BatchResponse]:
    """`POST /score/batch`: many `/score/fraud` or `/score/personalization` bodies at once."""
    body = _body(model_type=model_type, requests=[_plain(r) for r in requests], batch_id=batch_id)
    return Call("POST", "/score/batch", _model(BatchResponse), body)


# --- seed 003 ---------------------------------------------------------------------------------


def predict(
    model_name: str,
    features: Mapping[str, Sequence[float]],
    correlation_id: str | None = None,
    version: str | None = None,
    explain: bool | None = None,
) -> Call[GenericPredictResponse]:
    """`POST /predict`: any model by name, features as columns `{name: [values]}`; `explain`:
    per-row feature contributions too (tree models)."""
    body = _body(
        model_name=model_name,
        features={k: list(v) for k, v in features.items()},
        correlation_id=correlation_id,
        version=version,
        explain=explain,
    )
    return Call("POST", "/predict", _model(GenericPredictResponse), body)


def predict_batch(
    requests: Sequence[Mapping[str, Any] | BaseModel], batch_size: int | None = None
) -> Call[list[GenericPredictResponse]]:
    """`POST /predict/batch`: several `/predict` bodies; one answer each, in order."""
    body = _body(requests=[_plain(r) for r in requests], batch_size=batch_size)
    return Call("POST", "/predict/batch", _model(list[GenericPredictResponse]), body)


# --- seed 004 ---------------------------------------------------------------------------------


def v1_predict(
    instances: Sequence[Sequence[float]], version: str | None = None
) -> Call[m.V1Prediction]:
    """`POST /v1/models/predict`: rows of the v1 model (species by default)."""
    body = _body(instances=[list(row) for row in instances], version=version)
    return Call("POST", "/v1/models/predict", _model(m.V1Prediction), body)


def v1_models() -> Call[m.V1Models]:
    """`GET /v1/models`: models with their versions."""
    return Call("GET", "/v1/models", _model(m.V1Models))


# --- operations -------------------------------------------------------------------------------


def health() -> Call[m.Health]:
    """`GET /health`: status, loaded models, uptime, per-component status."""
    return Call("GET", "/health", _model(m.Health))


def ready() -> Call[m.Readiness]:
    """`GET /ready`: `status` is `ready`, or `not_ready` with a reason (not an error)."""
    return Call(
        "GET",
        "/ready",
        _model(m.Readiness),
        answers=frozenset({200, 503}),
        retry_statuses=frozenset(),
    )


def models() -> Call[m.ModelList]:
    """`GET /models`: every version of every model with its card and serving state."""
    return Call("GET", "/models", _model(m.ModelList))


def model(name: str) -> Call[m.ModelFamily]:
    """`GET /models/{name}`: one model's versions."""
    return Call("GET", f"/models/{_seg(name)}", _model(m.ModelFamily))


def metrics() -> Call[str]:
    """`GET /metrics`: Prometheus text of every worker."""
    return Call("GET", "/metrics", str, text=True)


# --- LLM --------------------------------------------------------------------------------------


def generate(
    prompt: str,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
) -> Call[m.GenerateResponse]:
    """`POST /generate`: text from the LLM runner."""
    body = _body(
        prompt=prompt,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=list(stop) if stop is not None else None,
        seed=seed,
    )
    return Call("POST", "/generate", _model(m.GenerateResponse), body)


def generate_structured(
    prompt: str,
    json_schema: Mapping[str, Any] | None = None,
    response_model: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> Call[m.StructuredResponse]:
    """`POST /generate/structured`: JSON that validates against `json_schema` or the named
    `response_model`."""
    body = _body(
        prompt=prompt,
        json_schema=dict(json_schema) if json_schema is not None else None,
        response_model=response_model,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
    )
    return Call("POST", "/generate/structured", _model(m.StructuredResponse), body)


def circuit_breaker_status() -> Call[m.BreakerStatus]:
    """`GET /circuit-breaker/status`: the LLM backend's breaker."""
    return Call("GET", "/circuit-breaker/status", _model(m.BreakerStatus))


def circuit_breaker_reset() -> Call[m.BreakerStatus]:
    """`POST /circuit-breaker/reset`: close the breaker now."""
    return Call("POST", "/circuit-breaker/reset", _model(m.BreakerStatus))


def llm_status() -> Call[m.LLMStatus]:
    """`GET /llm/status`: engine, model, queue, breaker."""
    return Call("GET", "/llm/status", _model(m.LLMStatus))


# --- admin ------------------------------------------------------------------------------------


def register_model(
    name: str,
    version: str,
    model_path: str | None = None,
    artifact: bytes | None = None,
    filename: str | None = None,
    feature_names: Sequence[str] | None = None,
    task: str | None = None,
    description: str = "",
    sha256: str | None = None,
    framework: str | None = None,
    tags: Sequence[str] = (),
    performance_metrics: Mapping[str, float] | None = None,
) -> Call[m.Registered]:
    """`POST /models/register`: a path on the server, or the artifact's bytes with `filename`
    (`model.onnx`, `model.json` or `model.txt`). Needs `models:write`."""
    body = _body(
        name=name,
        version=version,
        model_path=model_path,
        artifact_base64=base64.b64encode(artifact).decode() if artifact is not None else None,
        filename=filename,
        feature_names=list(feature_names) if feature_names is not None else None,
        task=task,
        description=description,
        sha256=sha256,
        framework=framework,
        tags=list(tags),
        performance_metrics=dict(performance_metrics or {}),
    )
    return Call("POST", "/models/register", _model(m.Registered), body)


def activate(name: str, version: str) -> Call[m.Activated]:
    """`POST /models/{name:version}/activate`: 100% to the version once every worker has it."""
    return Call("POST", f"/models/{_seg(name)}:{_seg(version)}/activate", _model(m.Activated))


def deploy(
    name: str,
    version: str,
    strategy: Strategy = "immediate",
    steps: Sequence[int] | None = None,
    analysis_window_s: float | None = None,
    thresholds: Thresholds | Mapping[str, Any] | None = None,
) -> Call[m.Deployment]:
    """`POST /models/{name:version}/deploy`: `immediate`, `canary`, `blue-green` or `rolling`."""
    body = _body(
        strategy=strategy,
        steps=list(steps) if steps is not None else None,
        analysis_window_s=analysis_window_s,
        thresholds=_plain(thresholds) if thresholds is not None else None,
    )
    return Call("POST", f"/models/{_seg(name)}:{_seg(version)}/deploy", _model(m.Deployment), body)


def reload(model: str) -> Call[m.Reloaded]:
    """`POST /reload/{model}`: re-read the loaded versions from the store (seed 003)."""
    return Call("POST", f"/reload/{_seg(model)}", _model(m.Reloaded))


def traffic_split(model: str | None = None) -> Call[dict[str, int]]:
    """`GET /v1/traffic-split`: `{version: percent}` (the v1 model when `model` is None)."""
    return Call("GET", "/v1/traffic-split", _model(dict[str, int]), params=_family(model))


def set_traffic_split(weights: Mapping[str, int], model: str | None = None) -> Call[dict[str, int]]:
    """`POST /v1/traffic-split`: e.g. `{"v1": 90, "v2": 10}`; returns once every worker routes
    with it. Needs `traffic:write`."""
    return Call(
        "POST",
        "/v1/traffic-split",
        _model(dict[str, int]),
        dict(weights),
        params=_family(model),
    )


def set_shadows(versions: Sequence[str], model: str | None = None) -> Call[m.Shadows]:
    """`POST /v1/shadows`: versions that score mirrored traffic (answers never returned)."""
    return Call(
        "POST", "/v1/shadows", _model(m.Shadows), {"versions": list(versions)}, _family(model)
    )


def version_metrics(version: str, model: str | None = None) -> Call[m.VersionMetrics]:
    """`GET /v1/metrics/{version}`: success rate, latency percentiles, distribution, weight."""
    return Call(
        "GET", f"/v1/metrics/{_seg(version)}", _model(m.VersionMetrics), params=_family(model)
    )


def deployments() -> Call[list[m.Deployment]]:
    """`GET /deployments`: every rollout, newest first."""
    adapter = TypeAdapter(list[m.Deployment])
    return Call("GET", "/deployments", lambda body: adapter.validate_python(body["deployments"]))


def deployment(deployment_id: str) -> Call[m.Deployment]:
    """`GET /deployments/{id}`."""
    return Call("GET", f"/deployments/{_seg(deployment_id)}", _model(m.Deployment))


def events() -> Call[list[m.Transition]]:
    """`GET /events`: lifecycle transitions, newest first."""
    adapter = TypeAdapter(list[m.Transition])
    return Call("GET", "/events", lambda body: adapter.validate_python(body["events"]))


def start_ab_test(
    test_id: str,
    model_a: str,
    model_b: str,
    traffic_split: float,
    duration_hours: float = 24.0,
    success_metrics: Sequence[str] = (),
) -> Call[m.ABTest]:
    """`POST /ab-tests/start`: `model_a`/`model_b` as `name:version`; `traffic_split` is B's
    share in (0, 1)."""
    body = _body(
        test_id=test_id,
        model_a=model_a,
        model_b=model_b,
        traffic_split=traffic_split,
        duration_hours=duration_hours,
        success_metrics=list(success_metrics),
    )
    return Call("POST", "/ab-tests/start", _model(m.ABTest), body)


def ab_tests() -> Call[list[m.ABTestSummary]]:
    """`GET /ab-tests`: every test with its per-arm result."""
    adapter = TypeAdapter(list[m.ABTestSummary])
    return Call("GET", "/ab-tests", lambda body: adapter.validate_python(body["tests"]))


def stop_ab_test(test_id: str) -> Call[m.ABTest]:
    """`POST /ab-tests/{id}/stop`: restores the weights from before the test."""
    return Call("POST", f"/ab-tests/{_seg(test_id)}/stop", _model(m.ABTest))
