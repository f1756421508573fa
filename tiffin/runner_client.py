"""One way for the entry service to call a runner, whichever topology it runs in.

In-process, the runner instance is in this worker and its model pool is called directly (no
serialisation, no event-loop hop). As a separate process, the same calls go through BentoML's
remote proxy.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np

from tiffin.model_pool import ModelPool


class RunnerClient:
    def __init__(self, runner: Any, family: str | None = None) -> None:
        self.runner = runner
        self._pool: ModelPool | None = getattr(runner, "pool", None)
        self.family = family or (self._pool.family if self._pool else "")

    @property
    def in_process(self) -> bool:
        return self._pool is not None

    def version(self, version: str | None = None) -> str:
        if self._pool is not None:
            return self._pool.get(version).version
        return version or "default"

    def feature_names(self) -> list[str]:
        if self._pool is not None:
            return self._pool.get().card.feature_names
        return []

    async def predict(self, features: np.ndarray, version: str | None = None) -> np.ndarray:
        if self._pool is not None:
            return self._pool.predict(features, version)
        return await anyio.to_thread.run_sync(self.runner.predict_version, features, version)

    async def contributions(self, features: np.ndarray, version: str | None = None) -> np.ndarray:
        if self._pool is not None and len(features) <= 8:
            return self.runner.contributions(features, version)
        return await anyio.to_thread.run_sync(self.runner.contributions, features, version)

    def describe(self) -> list[dict[str, Any]]:
        if self._pool is not None:
            return self._pool.describe()
        return list(self.runner.versions())
