"""Answers of the endpoints that `tiffin.schemas` does not already describe.

The scoring endpoints' answers are `tiffin.schemas`' own models and the lifecycle objects are
`tiffin.lifecycle.traffic`'s, so the client and the service cannot drift apart. The models here
allow extra fields: the service adds fields over time (answers are additive), and a client
one version behind should keep working and still show them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tiffin.lifecycle.traffic import ABTest, Deployment, Transition

__all__ = [
    "ABTest",
    "ABTestSummary",
    "Activated",
    "BreakerStatus",
    "Deployment",
    "GenerateResponse",
    "Health",
    "LLMStatus",
    "ModelFamily",
    "ModelList",
    "ModelVersion",
    "Readiness",
    "Registered",
    "Reloaded",
    "Shadows",
    "StructuredResponse",
    "Transition",
    "Usage",
    "V1Model",
    "V1Models",
    "V1Prediction",
    "VersionMetrics",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Health(_Open):
    status: str
    models_loaded: int
    uptime_seconds: float
    models: list[str] = Field(default_factory=list)
    components: dict[str, dict[str, Any]] = Field(default_factory=dict)


class Readiness(_Open):
    status: str
    models: list[str] = Field(default_factory=list)
    reason: str | None = None


class ModelVersion(_Open):
    """One version with its card and, on a running service, its serving state."""

    name: str
    version: str
    framework: str
    task: str
    feature_names: list[str]
    output_names: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    data_seed: int | None = None
    created_at: float | None = None
    description: str = ""
    source: str = ""
    state: str | None = None
    serving_weight: int | None = None
    shadow: bool | None = None


class ModelFamily(_Open):
    name: str
    versions: list[ModelVersion]
    serving_version: str | None = None


class ModelList(_Open):
    models: list[ModelFamily]


class V1Model(_Open):
    name: str
    versions: list[str]
    serving_version: str | None = None
    task: str | None = None
    framework: str | None = None


class V1Models(_Open):
    models: list[V1Model]


class V1Prediction(_Open):
    model_name: str
    model_version: str
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    latency_ms: float


class Registered(ModelVersion):
    model_id: str
    status: str
    tags: list[str] = Field(default_factory=list)


class Activated(_Open):
    model_id: str
    status: str
    deployment: Deployment


class Reloaded(_Open):
    message: str
    revision: int | None = None


class Shadows(_Open):
    shadows: list[str]


class VersionMetrics(_Open):
    model: str
    version: str
    weight: int
    shadow: bool
    requests: int
    errors: int
    success_rate: float | None = None
    error_rate: float | None = None
    latency_ms: dict[str, float | None] = Field(default_factory=dict)
    prediction_distribution: dict[str, int] = Field(default_factory=dict)


class ABTestSummary(ABTest):
    """An A/B test as `GET /ab-tests` lists it: with its current per-arm result."""

    model_config = ConfigDict(extra="allow")
    result: dict[str, Any] | None = None


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(_Open):
    text: str
    model: str
    engine: str
    finish_reason: str
    usage: Usage
    latency_ms: float
    time_to_first_token_ms: float | None = None
    tokens_per_second: float | None = None


class StructuredResponse(_Open):
    data: Any
    valid: bool = True
    schema_name: str
    model: str
    engine: str
    attempts: int
    usage: Usage
    latency_ms: float


class BreakerStatus(_Open):
    component: str = "llm"
    state: str | None = None


class LLMStatus(_Open):
    status: str
    engine: str | None = None
    model: str | None = None
    response_models: list[str] = Field(default_factory=list)
