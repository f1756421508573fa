"""The loaded versions of one model family, shared by every runner service.

A runner declares its packaged default version at class scope (so `bentoml build` ships it); any
other version in the model store can be loaded beside it. Loading is all-or-nothing: a version that
fails to load or warm up is recorded as failed and never replaces a serving one.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from tiffin import model_store
from tiffin.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelUnavailable
from tiffin.metrics import metrics
from tiffin.runtimes import LoadedModel, load_artifacts

log = logging.getLogger("tiffin.models")


class ModelPool:
    def __init__(self, family: str, default_version: str) -> None:
        self.family = family
        self.default_version = default_version
        self._loaded: dict[str, LoadedModel] = {}
        self.failed: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_declared(cls, tag: object) -> ModelPool:
        """Pool whose default is a class-scope `BentoModel` (its tag resolved against the store)."""
        model = model_store.get(*str(tag).split(":", 1))
        pool = cls(model.tag.name, model.tag.version or "latest")
        try:
            pool.load(pool.default_version)
        except ModelLoadError as exc:  # the worker still starts: readiness says why it is down
            log.error("%s:%s cannot be served: %s", pool.family, pool.default_version, exc)
        return pool

    @property
    def versions(self) -> list[str]:
        return list(self._loaded)

    def load(self, version: str) -> LoadedModel:
        if version in self._loaded:
            return self._loaded[version]
        with self._lock:
            if version in self._loaded:
                return self._loaded[version]
            started = time.perf_counter()
            stored = model_store.get(self.family, version)
            try:
                loaded = load_artifacts(
                    self.family,
                    stored.tag.version or version,
                    Path(stored.path),
                    model_store.card_of(stored),
                )
            except ModelLoadError as exc:
                self.failed[version] = str(exc)
                metrics().errors.labels(self.family, version, "load").inc()
                raise
            self._loaded[loaded.version] = loaded
            self.failed.pop(version, None)
            metrics().load_time.labels(self.family, loaded.version).set(
                time.perf_counter() - started
            )
            metrics().active_models.labels(self.family, loaded.version).set(1)
            log.info(
                "loaded %s:%s in %.3fs", self.family, loaded.version, time.perf_counter() - started
            )
            return loaded

    def reload_loaded(self) -> None:
        """Re-read every loaded version from the store; a version that fails keeps serving as is."""
        for version in list(self._loaded):
            stored = model_store.get(self.family, version)
            try:
                fresh = load_artifacts(
                    self.family, version, Path(stored.path), model_store.card_of(stored)
                )
            except ModelLoadError as exc:
                self.failed[version] = f"reload failed, previous copy kept serving: {exc}"
                continue
            self._loaded[version] = fresh
            log.info("reloaded %s:%s", self.family, version)

    def get(self, version: str | None = None) -> LoadedModel:
        """The requested version (loaded from the store on first use) or the serving default."""
        version = version or self.default_version
        found = self._loaded.get(version)
        if found is not None:
            return found
        if version in self.failed:  # no artifact reload per request; `load` retries on purpose
            raise ModelUnavailable(
                f"model {self.family}:{version} cannot be served: {self.failed[version]}"
            )
        try:
            return self.load(version)
        except ModelNotFound as exc:
            raise ModelNotFound(
                f"version {version!r} of model {self.family!r} does not exist"
            ) from exc

    def predict(self, features: np.ndarray, version: str | None = None) -> np.ndarray:
        model = self.get(version)
        self.check_width(model, features)
        return model.predict(np.ascontiguousarray(features, dtype=np.float32))

    @staticmethod
    def check_width(model: LoadedModel, features: np.ndarray) -> None:
        if features.ndim != 2 or features.shape[1] != model.n_features:
            raise InvalidInput(
                f"model {model.name}:{model.version} expects {model.n_features} features per "
                f"row, got {features.shape[-1] if features.ndim else 0}"
            )

    def describe(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = [
            {"version": v, "state": "loaded", "default": v == self.default_version}
            for v in self._loaded
        ]
        rows += [{"version": v, "state": "failed", "reason": r} for v, r in self.failed.items()]
        return rows
