"""Tiffin's Python client: `TiffinClient` (sync) and `AsyncTiffinClient`, typed answers, typed
errors, retries; remote over HTTP or local in process (seed 003's `REMOTE_INFERENCE_*`)."""

from tiffin.client import models
from tiffin.client.clients import AsyncTiffinClient, TiffinClient
from tiffin.client.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServerError,
    ServiceUnavailable,
    TiffinClientError,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnprocessableEntity,
)
from tiffin.client.settings import ClientSettings

__all__ = [
    "AsyncTiffinClient",
    "BadGateway",
    "BadRequest",
    "ClientSettings",
    "Conflict",
    "Forbidden",
    "NotFound",
    "ServerError",
    "ServiceUnavailable",
    "TiffinClient",
    "TiffinClientError",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "UnprocessableEntity",
    "models",
]
