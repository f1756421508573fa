"""OpenTelemetry spans for the steps of a request: feature fetch and model call.

Spans go to the tracer provider BentoML installs from its `tracing` configuration (exporter,
sampler), so they nest under BentoML's request span. Tracing is off by default
(`TIFFIN_TRACING`): then `span()` hands back one shared no-op context manager, so the request
path pays one attribute check and nothing else.

    spans = Spans(server_settings().tracing)
    with spans.span("tiffin.feature_fetch", model=name, version=version, backend="redis"):
        ...
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

FEATURE_FETCH = "tiffin.feature_fetch"
MODEL_CALL = "tiffin.model_call"
_OFF: AbstractContextManager[None] = contextlib.nullcontext()


class Spans:
    """Span factory for one worker (built by the composition root, not a module global)."""

    def __init__(self, enabled: bool, provider: Any = None) -> None:
        self.enabled = enabled
        self._tracer: Any = None
        if enabled:
            from opentelemetry import trace

            self._tracer = trace.get_tracer("tiffin", tracer_provider=provider)

    def span(
        self, name: str, **attributes: str | int | float | bool
    ) -> AbstractContextManager[Any]:
        if self._tracer is None:
            return _OFF
        return self._tracer.start_as_current_span(name, attributes=attributes)
