"""Run an entry service's `bentoml.depends` runners inside its own worker processes.

BentoML 1.4 starts every dependency as separate processes and reaches it over HTTP. On a small
box that hop costs more than the models do (and has dropped requests under load; see
docs/benchmarks.md and docs/upstream.md). BentoML already falls back to instantiating a dependency
in-process when no URL is mapped for it; removing the runners from the entry's dependency map does
exactly that, while their class-scope models are added to the entry so `bentoml build` still
packages them.
"""

from __future__ import annotations

from typing import Any


def serve_runners_in_process(entry: Any) -> Any:
    for name, dependency in list(entry.dependencies.items()):
        runner = dependency.on
        if runner is None:
            continue
        for service in runner.all_services().values():
            for model in service.models:
                if model not in entry.models:
                    entry.models.append(model)
        del entry.dependencies[name]
    return entry


def cache_output_media_types(service: Any) -> Any:
    """Compute each API's response media type once instead of on every response.

    BentoML 1.4.39 derives it in `IOMixin.mime_type()` by generating the output model's JSON
    schema per response (a measured ~17% of worker CPU on small responses; docs/upstream.md).
    The answer never changes for a given API, and `mime_type()` returns `media_type` when set.
    """
    for method in service.apis.values():
        spec = method.output_spec
        if getattr(spec, "media_type", None) is None:
            spec.media_type = spec.mime_type()
    return service
