"""Settings, one pydantic-settings class per concern.

Every class reads its own environment prefix. Where the seed services already named a variable
(``PORT``, ``WORKERS``, ``LOG_LEVEL``, ``MODEL_DIR``, ``REDIS_*``) that name is accepted too, so
existing deployments keep working.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class ServerSettings(BaseSettings):
    """How the entry service is served."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_", extra="ignore")

    port: int = Field(3000, validation_alias=_env("TIFFIN_PORT", "PORT"), ge=1, le=65535)
    """HTTP port `make serve` binds (`PORT` in the seeds)."""

    workers: int = Field(2, validation_alias=_env("TIFFIN_WORKERS", "WORKERS"), ge=1, le=64)
    """Worker processes of the entry service (`WORKERS` in the seeds)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias=_env("TIFFIN_LOG_LEVEL", "LOG_LEVEL")
    )
    """Logging level of Tiffin's own loggers (`LOG_LEVEL` in the seeds)."""

    environment: Literal["development", "production"] = Field(
        "development", validation_alias=_env("TIFFIN_ENVIRONMENT", "ENVIRONMENT")
    )
    """`production` refuses unsafe defaults; `development` is what `make serve` runs."""

    access_log: bool = False
    """BentoML's per-request access log line. Off by default: writing it costs more CPU than
    scoring a request (docs/benchmarks.md); metrics and traces still cover every request."""

    tracing: bool = False
    """OpenTelemetry spans for every request (configure the exporter with BentoML's `tracing`
    settings). Off by default: creating spans costs ~10% of a scoring request's CPU."""

    http_metrics: bool = False
    """BentoML's generic per-route `bentoml_service_*` metrics, on top of Tiffin's per-model
    ones. Off by default for the same reason; `/metrics` is served either way."""

    max_batch_rows: int = Field(1024, ge=1, le=100_000)
    """Largest number of rows one batch request may carry; larger batches get a 4xx."""

    batch_concurrency: int = Field(8, ge=1, le=1024)
    """`/score/batch` requests one worker decodes and scores at once; later ones wait as raw
    bytes, in arrival order. Under overload every batch held decoded at once costs ~0.5 MB of
    Python objects that the process keeps afterwards; a few in flight keep the core busy while
    others wait on Redis (2 cost ~15% of the batch throughput, 8 none, measured)."""


class FeatureStoreSettings(BaseSettings):
    """The online feature store: Redis in production, an embedded in-process store otherwise."""

    model_config = SettingsConfigDict(env_prefix="REDIS_", extra="ignore")

    url: str | None = None
    """`redis://[:password@]host:port/db`. When unset (and `REDIS_HOST` unset too) Tiffin uses the
    embedded store, seeded in process from the same generator, and says so on `/health`."""

    host: str | None = None
    """Redis host, used when `REDIS_URL` is unset (seed 001's `REDIS_HOST`)."""

    port: int = Field(6379, ge=1, le=65535)
    """Redis port, used with `REDIS_HOST`."""

    password: str | None = None
    """Redis password, used with `REDIS_HOST`."""

    db: int = Field(0, ge=0)
    """Redis database number, used with `REDIS_HOST`."""

    timeout_ms: float = Field(50.0, gt=0)
    """Socket timeout for one feature fetch; past it the request is scored on defaults (degraded)
    rather than failing."""

    retry_after_s: float = Field(2.0, ge=0)
    """After a Redis failure, how long to score on defaults before trying Redis again, so an outage
    does not add a timeout to every request."""

    key_prefix: str = "features"
    """Prefix of every feature key: `<prefix>:<entity>:<id>`."""

    embedded_entities: int = Field(10_000, ge=10)
    """How many cards/users the embedded store generates at start-up."""

    def resolved_url(self) -> str | None:
        if self.url:
            return self.url
        if self.host:
            auth = f":{self.password}@" if self.password else ""
            return f"redis://{auth}{self.host}:{self.port}/{self.db}"
        return None


class ModelSettings(BaseSettings):
    """Where models come from and which ones the seed APIs use by default."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_", extra="ignore")

    model_dir: str | None = Field(None, validation_alias=_env("TIFFIN_MODEL_DIR", "MODEL_DIR"))
    """A directory in seed 000's layout (`<name>/<version>/model.onnx` + `metadata.json`) imported
    into the BentoML model store by `make serve` (`MODEL_DIR` in seed 000)."""

    v1_model: str = "species_classifier"
    """The model family behind seed 004's `/v1/models/predict`."""

    train_rows: int = Field(40_000, ge=1_000)
    """Rows of generated data per training pipeline."""


@lru_cache
def server_settings() -> ServerSettings:
    return ServerSettings()


@lru_cache
def feature_store_settings() -> FeatureStoreSettings:
    return FeatureStoreSettings()


@lru_cache
def model_settings() -> ModelSettings:
    return ModelSettings()
