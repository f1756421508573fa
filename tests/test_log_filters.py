"""Client errors logged by BentoML's own `log_exception` become one INFO line without a
traceback; server errors keep ERROR and their traceback (real BentoML function, real records)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from bentoml._internal.server.http_app import log_exception
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tiffin.errors import InvalidInput, ModelNotFound, ModelUnavailable
from tiffin.log_filters import (
    BENTOML_HTTP_LOGGER,
    ClientErrorLogFilter,
    RepeatedTracebackFilter,
    client_error_status,
    install_client_error_log_filter,
)


class Body(BaseModel):
    amount: float


def request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/score/fraud", "headers": []})


def logged(exc: Exception, caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    caplog.clear()
    try:
        raise exc
    except Exception:
        log_exception(request())  # what BentoML's api_endpoint_wrapper calls
    (record,) = [r for r in caplog.records if r.name == BENTOML_HTTP_LOGGER]
    return record


@pytest.fixture
def installed() -> Iterator[ClientErrorLogFilter]:
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    before = list(logger.filters)
    installed = install_client_error_log_filter()
    assert install_client_error_log_filter() is installed  # idempotent
    yield installed
    logger.filters[:] = before


def validation_error() -> ValidationError:
    try:
        Body.model_validate({"amount": "lots"})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


def test_client_errors_become_one_info_line(
    installed: ClientErrorLogFilter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=BENTOML_HTTP_LOGGER)
    for exc, status in [
        (validation_error(), 400),
        (InvalidInput("temperature: 5 is out of range [0, 2]"), 422),
        (ModelNotFound("model 'nope' is not in the model store"), 404),
    ]:
        record = logged(exc, caplog)
        assert record.levelno == logging.INFO and record.exc_info is None
        text = caplog.text
        assert f"client error {status}" in text and "Traceback" not in text
        assert "/score/fraud" in record.getMessage()


def test_server_errors_keep_error_and_traceback(
    installed: ClientErrorLogFilter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=BENTOML_HTTP_LOGGER)
    for exc in (RuntimeError("engine exploded"), ModelUnavailable("every version failed")):
        record = logged(exc, caplog)
        assert record.levelno == logging.ERROR and record.exc_info is not None
        assert "Traceback" in caplog.text


def test_client_errors_are_silent_when_info_is_off(
    installed: ClientErrorLogFilter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=BENTOML_HTTP_LOGGER)
    caplog.clear()
    try:
        raise InvalidInput("seed: out of range")
    except InvalidInput:
        log_exception(request())
    assert caplog.records == []


def test_without_the_filter_bentoml_logs_client_errors_at_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finding itself: proves the filter is what changes the level."""
    # importing service.py (other tests do) installs the filter process-wide: take it off here
    monkeypatch.setattr(logging.getLogger(BENTOML_HTTP_LOGGER), "filters", [])
    caplog.set_level(logging.INFO, logger=BENTOML_HTTP_LOGGER)
    record = logged(InvalidInput("seed: out of range"), caplog)
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_status_classification() -> None:
    from starlette.exceptions import HTTPException

    assert client_error_status(HTTPException(413)) == 413
    assert client_error_status(HTTPException(503)) is None
    assert client_error_status(ValueError("x")) is None
    assert client_error_status(None) is None


def test_repeated_background_tracebacks_are_logged_once_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    logger = logging.getLogger("tiffin.test-background")
    logger.addFilter(RepeatedTracebackFilter(window_s=60, clock=lambda: now[0]))
    caplog.set_level(logging.INFO, logger="tiffin.test-background")

    def tick(exc: Exception) -> None:
        try:
            raise exc
        except Exception:
            logger.exception("lifecycle tick failed")

    for _ in range(50):  # a Redis outage, ticking every 0.1 s
        tick(ConnectionError("Connection closed by server."))
        now[0] += 0.1
    tick(TimeoutError("Timeout reading"))  # a different failure is reported at once
    now[0] += 60
    tick(ConnectionError("Connection closed by server."))
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "lifecycle tick failed",
        "lifecycle tick failed",
        "lifecycle tick failed (the same failure 49 more times since the last report)",
    ]
    assert all(r.exc_info for r in caplog.records)
