"""Saving and describing models in the BentoML model store.

Every Tiffin model version is one BentoML model whose directory holds the artifacts (`model.onnx`
for serving; `model.json` / `model.txt` when a native booster is kept for explanations) and whose
metadata is a :class:`ModelCard`. One layout for every framework means one loader.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import bentoml
from pydantic import BaseModel, Field

from tiffin.drift import Reference
from tiffin.errors import ModelNotFound

Task = Literal["binary", "multiclass", "regression", "multi_output"]
ARTIFACT_FILES = {"onnx": "model.onnx", "xgboost": "model.json", "lightgbm": "model.txt"}
LABEL_OWNER = "tiffin"


class ModelCard(BaseModel):
    """What Tiffin knows about one model version; stored as the BentoML model's metadata."""

    family: str
    framework: str
    task: Task
    feature_names: list[str]
    output_names: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    data_seed: int | None = None
    created_at: float = Field(default_factory=time.time)
    description: str = ""
    checksums: dict[str, str] = Field(default_factory=dict)
    source: str = "trained"
    reference: Reference | None = None
    """Feature and score distributions of the training (or import) rows, for drift
    (`tiffin.drift`); absent on versions saved before drift tracking, which still load."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(
    name: str,
    version: str,
    artifacts: Mapping[str, bytes],
    card: ModelCard,
    labels: Mapping[str, str] | None = None,
) -> bentoml.Tag:
    """Write one model version. `artifacts` maps file names (see ARTIFACT_FILES) to bytes."""
    card = card.model_copy(
        update={"checksums": {fname: sha256_bytes(blob) for fname, blob in artifacts.items()}}
    )
    all_labels = {
        "owner": LABEL_OWNER,
        "family": card.family,
        "framework": card.framework,
        **(labels or {}),
    }
    with bentoml.models.create(
        bentoml.Tag(name, version),
        labels=all_labels,
        metadata=card.model_dump(mode="json", exclude_none=True),
        module="tiffin.model_store",
    ) as model_ref:
        for fname, blob in artifacts.items():
            Path(model_ref.path, fname).write_bytes(blob)
    return model_ref.tag


def exists(name: str, version: str) -> bool:
    try:
        bentoml.models.get(bentoml.Tag(name, version))
    except (bentoml.exceptions.NotFound, ValueError):  # ValueError: not a valid tag at all
        return False
    return True


def get(name: str, version: str | None = None) -> bentoml.Model:
    """A stored version; a name or version BentoML's tag rules refuse cannot be stored, so it is
    not found either (404, never a 500)."""
    try:
        return bentoml.models.get(bentoml.Tag(name, version or "latest"))
    except (bentoml.exceptions.NotFound, bentoml.exceptions.InvalidArgument, ValueError) as exc:
        what = f"version {version!r} of model {name!r}" if version else f"model {name!r}"
        raise ModelNotFound(f"{what} is not in the model store") from exc


def card_of(model: bentoml.Model) -> ModelCard:
    return ModelCard.model_validate(model.info.metadata)


def tiffin_models() -> list[bentoml.Model]:
    """Every Tiffin model version in the store, newest first within each name."""
    models = [m for m in bentoml.models.list() if m.info.labels.get("owner") == LABEL_OWNER]
    return sorted(models, key=lambda m: (m.tag.name, -m.info.creation_time.timestamp()))


def describe(model: bentoml.Model) -> dict[str, Any]:
    card = card_of(model)
    return {
        "name": model.tag.name,
        "version": model.tag.version,
        "tag": str(model.tag),
        "framework": card.framework,
        "task": card.task,
        "feature_names": card.feature_names,
        "output_names": card.output_names,
        "metrics": card.metrics,
        "data_seed": card.data_seed,
        "created_at": card.created_at,
        "description": card.description,
        "source": card.source,
    }
