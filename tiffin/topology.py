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
