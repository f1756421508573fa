"""Request and response bodies, exactly as the seeds show them (extra response fields are additive).

Request models reject what cannot be scored with a message naming the field; responses are plain
pydantic models so the OpenAPI document at `/docs` shows them.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tiffin.featurize import AD_FORMATS, COMPETITION_LEVELS
from tiffin.llm.response_models import FraudExplanation
from tiffin.settings import server_settings

NonEmptyId = Annotated[str, Field(min_length=1, max_length=128)]
MAX_ROWS = server_settings().max_batch_rows


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


# --- seed 000 ---------------------------------------------------------------------------------


class AdFraudRequest(_Request):
    user_id: NonEmptyId
    ip_address: str = Field(max_length=64)
    user_agent: str = Field("", max_length=2048)
    impressions_24h: int = Field(ge=0, le=10**9)
    clicks_24h: int = Field(ge=0, le=10**9)

    @field_validator("ip_address")
    @classmethod
    def _valid_ip(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
        return value


class CtrRequest(_Request):
    placement_id: NonEmptyId
    ad_format: Literal[AD_FORMATS]  # type: ignore[valid-type]
    user_segments: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=64
    )
    time_of_day: int = Field(ge=0, le=23)
    day_of_week: int = Field(ge=0, le=6)


class BidRequest(_Request):
    placement_id: NonEmptyId
    floor_cpm: float = Field(ge=0, le=10_000)
    predicted_ctr: float = Field(ge=0, le=1)
    competition_level: Literal[COMPETITION_LEVELS]  # type: ignore[valid-type]
    budget_remaining: float = Field(ge=0)


class AdFraudResponse(BaseModel):
    user_id: str
    fraud_probability: float
    is_fraud: bool
    risk_level: Literal["low", "medium", "high"]
    model_version: str
    latency_ms: float


class CtrResponse(BaseModel):
    placement_id: str
    predicted_ctr: float
    model_version: str
    latency_ms: float


class BidResponse(BaseModel):
    placement_id: str
    recommended_bid_cpm: float
    floor_cpm: float
    should_bid: bool
    reason: str
    model_version: str
    latency_ms: float


# --- seed 001 ---------------------------------------------------------------------------------


class CardFraudRequest(_Request):
    card_id: NonEmptyId
    transaction_amount: float = Field(gt=0, le=10**7)
    merchant_id: NonEmptyId | None = None
    mcc_code: str | None = Field(None, pattern=r"^\d{4}$")
    country_code: str | None = Field(None, pattern=r"^[A-Za-z]{2}$")
    llm_explanation: bool = False
    """Also return an LLM-written, schema-valid explanation (rule-based when the LLM is slow or
    unavailable)."""


class PersonalizationRequest(_Request):
    user_id: NonEmptyId
    item_id: NonEmptyId
    item_category: str | None = Field(None, max_length=64)
    item_price: float | None = Field(None, ge=0, le=10**7)
    session_id: NonEmptyId | None = None


class FeatureStatus(BaseModel):
    """Where a row's features came from: `features` in each `/score/batch` row; the single
    endpoints send it as `X-Tiffin-Feature-*` headers, their bodies being seed 001's."""

    source: Literal["redis", "embedded"]
    defaults_used: list[str] = Field(description="entities scored on documented default features")
    degraded: bool = Field(description="true when the feature store was unreachable")


class CardFraudResponse(BaseModel):
    """Seed 001's body; the two `llm_explanation` fields only when the request asked for one."""

    fraud_score: float
    risk_level: Literal["low", "medium", "high"]
    confidence: float
    recommended_action: Literal["approve", "review", "decline"]
    explanation: str
    top_risk_factors: list[str]
    features_used: int
    latency_ms: float
    model_version: str
    feature_freshness_sec: int | None
    llm_explanation: FraudExplanation | None = None
    llm_explanation_source: Literal["llm", "rules"] | None = None


class CardFraudRow(CardFraudResponse):
    """One `/score/batch` row of a fraud batch: the single answer plus what tells rows apart."""

    card_id: str
    features: FeatureStatus


class PersonalizationResponse(BaseModel):
    """Seed 001's body."""

    relevance_score: float
    conversion_probability: float
    engagement_score: float
    user_segment: str
    behavioral_signals: list[str]
    features_used: int
    latency_ms: float
    model_version: str


class PersonalizationRow(PersonalizationResponse):
    """One `/score/batch` row of a personalization batch."""

    user_id: str
    item_id: str
    feature_freshness_sec: int | None
    features: FeatureStatus


BatchModelType = Literal["fraud_detection", "fraud", "card_fraud", "personalization"]


BatchItems = Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_ROWS)]


class BatchResponse(BaseModel):
    batch_id: str | None
    model_type: str
    count: int
    results: list[CardFraudRow] | list[PersonalizationRow]
    model_version: str
    latency_ms: float


# --- seed 003 ---------------------------------------------------------------------------------


class GenericPredictRequest(_Request):
    model_name: NonEmptyId
    features: dict[str, list[float]] = Field(min_length=1)
    correlation_id: str | None = Field(None, max_length=128)
    version: str | None = Field(None, max_length=64)
    explain: bool = False
    """Also return each row's per-feature contributions (tree models: XGBoost, LightGBM); a
    model without an explainer answers 422 naming `explain`."""


class Contribution(BaseModel):
    feature: str
    contribution: float


class RowExplanation(BaseModel):
    base_value: float = Field(
        description="the model's expected raw output; base_value + the contributions = this "
        "row's raw output (log-odds for binary models, the value for regression)"
    )
    contributions: list[Contribution] = Field(description="every feature, largest |value| first")
    factor_groups: dict[str, float] | None = Field(
        None, description="summed contributions of the family's named factor groups, if any"
    )


class Explanations(BaseModel):
    method: Literal["path", "tree_shap"] = Field(
        description="`path`: XGBoost's `pred_contribs` with `approx_contribs=True` (Saabas); "
        "`tree_shap`: LightGBM's `pred_contrib` (TreeSHAP)"
    )
    rows: list[RowExplanation]


class GenericPredictResponse(BaseModel):
    prediction: list[float | int]
    confidence: list[float]
    probabilities: dict[str, list[float]]
    correlation_id: str
    model_version: str
    latency_ms: float
    explanations: Explanations | None = None
    """Present when the request asked for `explain`."""


GenericRequests = Annotated[list[GenericPredictRequest], Field(min_length=1, max_length=MAX_ROWS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_ROWS)]

# --- seed 004 ---------------------------------------------------------------------------------

Instances = Annotated[
    list[Annotated[list[float], Field(min_length=1, max_length=10_000)]],
    Field(min_length=1, max_length=MAX_ROWS),
]
