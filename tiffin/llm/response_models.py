"""Named response models for `/generate/structured` (`"response_model": "<name>"`).

Each is a pydantic model; its JSON Schema drives constrained decoding and its validation is the
final check. Bounds are explicit so outputs stay short and every field is meaningful to a client.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FraudExplanation(_Strict):
    """Why a card transaction got its fraud score, for an analyst or the card holder."""

    summary: str = Field(min_length=1, max_length=160, description="one-sentence explanation")
    risk_level: Literal["low", "medium", "high"]
    key_factors: list[str] = Field(
        min_length=1, max_length=3, description="the main risk factors, most important first"
    )
    recommended_action: Literal["approve", "review", "decline"]
    confidence: float = Field(ge=0, le=1)


class Sentiment(_Strict):
    """Sentiment of a text."""

    label: Literal["positive", "neutral", "negative"]
    score: float = Field(ge=0, le=1)


class Summary(_Strict):
    """A short title and a few bullet points."""

    title: str = Field(min_length=1, max_length=60)
    bullet_points: list[str] = Field(min_length=1, max_length=5)


class Entity(_Strict):
    name: str = Field(min_length=1, max_length=60)
    type: Literal["person", "organization", "location", "product", "other"]


class Entities(_Strict):
    """Named entities found in a text."""

    entities: list[Entity] = Field(max_length=8)


class Classification(_Strict):
    """A free-form category with a confidence."""

    category: str = Field(min_length=1, max_length=40)
    confidence: float = Field(ge=0, le=1)


RESPONSE_MODELS: dict[str, type[BaseModel]] = {
    "fraud_explanation": FraudExplanation,
    "sentiment": Sentiment,
    "summary": Summary,
    "entities": Entities,
    "classification": Classification,
}
