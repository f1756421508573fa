"""Any model a user brings (ONNX, XGBoost JSON, LightGBM text), addressed by name.

Serves seed 003's `/predict` for models without a dedicated runner and seed 004's
`/v1/models/predict`. The models declared here are the ones packaged into the Bento; any other
Tiffin model in the store is loaded on first use.
"""

from __future__ import annotations

import threading
from typing import Any

import bentoml
import numpy as np
from bentoml.models import BentoModel

from tiffin import model_store
from tiffin.model_pool import ModelPool


@bentoml.service(name="generic_runner", workers=1)
class GenericRunner:
    your_model = BentoModel("your_model:1.0.0")
    species_v1 = BentoModel("species_classifier:v1")
    species_v2 = BentoModel("species_classifier:v2")
    species_v2_quantized = BentoModel("species_classifier:v2-quantized")

    def __init__(self) -> None:
        self._pools: dict[str, ModelPool] = {}
        self._lock = threading.Lock()
        for declared in (self.your_model, self.species_v1):
            self.pool(declared.tag.name, declared.tag.version)

    def pool(self, name: str, default_version: str | None = None) -> ModelPool:
        if name not in self._pools:
            with self._lock:
                if name not in self._pools:
                    version = default_version or model_store.get(name).tag.version
                    pool = ModelPool(name, version)
                    pool.load(version)
                    self._pools[name] = pool
        return self._pools[name]

    @bentoml.api
    def predict_version(
        self, name: str, features: np.ndarray, version: str | None = None
    ) -> np.ndarray:
        return self.pool(name).predict(features, version)

    @bentoml.api
    def card(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The model card of the version that `predict_version` would use."""
        model = self.pool(name).get(version)
        return {"version": model.version, **model.card.model_dump(mode="json")}

    @bentoml.api
    def versions(self) -> dict[str, list[dict[str, Any]]]:
        return {name: pool.describe() for name, pool in self._pools.items()}
