"""Schemathesis over Tiffin's own OpenAPI document, every operation, in process with real models
(the same application `bentoml serve` hosts): no 5xx, and every 200 body matches its schema.
A fixed, derandomized budget of examples per operation keeps it to about a minute and makes a
failure reproducible."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tiffin.app import TiffinApp, local_app

EXAMPLES = 12


@pytest.fixture(scope="module")
def app(model_store: str) -> TiffinApp:
    return local_app()


def _fuzz(operation: Any) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

    run()


def test_every_operation_answers_without_5xx_and_as_documented(app: TiffinApp) -> None:
    schema = schemathesis.openapi.from_asgi("/docs.json", app)
    failures, operations = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        try:
            _fuzz(operation)
        except Exception as exc:  # collect every operation's failure, not just the first
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:2000])
    assert operations >= 40, operations
    assert not failures, "\n\n".join(failures)
