"""The API every tabular runner service shares; a runner file only declares its model.

`@bentoml.service` collects API methods from base classes too, so each runner is a three-line
subclass with its packaged model at class scope (which is what makes `bentoml build` ship it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import bentoml
import numpy as np

from tiffin.model_pool import ModelPool


class TabularRunner:
    model: ClassVar[Any]  # a bentoml.models.BentoModel declared by each runner

    def __init__(self) -> None:
        self.pool = ModelPool.for_declared(self.model.tag)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=512, max_latency_ms=200)
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Scores from the serving version; adaptive batching applies when run as a process."""
        return self.pool.predict(features)

    @bentoml.api
    def predict_version(self, features: np.ndarray, version: str | None = None) -> np.ndarray:
        return self.pool.predict(features, version)

    @bentoml.api
    def contributions(self, features: np.ndarray, version: str | None = None) -> np.ndarray:
        """Per-prediction feature contributions (raw margin) from the native booster."""
        model = self.pool.get(version)
        if model.explainer is None:
            return np.zeros_like(features, dtype=np.float32)
        return model.explainer.contributions(features)

    @bentoml.api
    def versions(self) -> list[dict[str, Any]]:
        return self.pool.describe()
