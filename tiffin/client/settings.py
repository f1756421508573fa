"""The client's settings: seed 003's `REMOTE_INFERENCE_*` names, or `TIFFIN_CLIENT_*`."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """How `TiffinClient` reaches Tiffin. Constructor arguments override every field."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_CLIENT_", extra="ignore")

    remote_enabled: bool = Field(
        False,
        validation_alias=AliasChoices("TIFFIN_CLIENT_REMOTE_ENABLED", "REMOTE_INFERENCE_ENABLED"),
    )
    """Seed 003's `REMOTE_INFERENCE_ENABLED`: true calls the service at `url`; false (the seed's
    default) runs the same calls in process against the local model store."""

    url: str = Field(
        "http://localhost:3000",
        validation_alias=AliasChoices("TIFFIN_CLIENT_URL", "REMOTE_INFERENCE_URL"),
    )
    """Seed 003's `REMOTE_INFERENCE_URL`. The default is Tiffin's port (`make serve`), not the
    seed's 8000, which was its own FastAPI server's."""

    timeout_s: float = Field(
        30.0,
        gt=0,
        validation_alias=AliasChoices("TIFFIN_CLIENT_TIMEOUT_S", "REMOTE_INFERENCE_TIMEOUT"),
    )
    """Seed 003's `REMOTE_INFERENCE_TIMEOUT`: seconds for one attempt (connect, send, answer)."""

    retries: int = Field(3, ge=0, le=10)
    """Extra attempts after a 503, a 429 or a connection failure (never after any other answer:
    a scoring request the service has seen is not repeated)."""

    backoff_s: float = Field(0.1, ge=0)
    """First retry delay; doubled on every further retry, with full jitter."""

    max_backoff_s: float = Field(5.0, ge=0)
    """Cap of one computed retry delay."""

    max_retry_after_s: float = Field(30.0, ge=0)
    """The longest `Retry-After` honoured; a longer one is not waited for and the error is
    raised at once, so a caller is never parked for minutes without knowing."""

    token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("TIFFIN_CLIENT_TOKEN", "TIFFIN_TOKEN")
    )
    """Bearer JWT sent with every request (the admin API needs one; see `tiffin.auth`)."""
