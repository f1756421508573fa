"""Typed errors that carry their HTTP status, so handlers never decide codes ad hoc."""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BentoMLException


class TiffinError(BentoMLException):
    """Base class: the message is shown to the client, so it must name the offending field."""

    error_code = HTTPStatus.INTERNAL_SERVER_ERROR


class InvalidInput(TiffinError):
    """The request is well-formed JSON but a field's value cannot be used."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class ModelNotFound(TiffinError):
    """No such model family, or no such version of it."""

    error_code = HTTPStatus.NOT_FOUND


class Conflict(TiffinError):
    """The request clashes with the current state (e.g. a version that already exists)."""

    error_code = HTTPStatus.CONFLICT


class ModelLoadError(TiffinError):
    """An artifact that cannot be loaded or does not match its declared schema."""

    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


class ModelUnavailable(TiffinError):
    """The model cannot answer right now (every eligible version failed)."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class RunnerUnavailable(ModelUnavailable):
    """A runner service (separate process or remote) did not answer: not the model's fault, so
    it never counts against a version's error rate."""
