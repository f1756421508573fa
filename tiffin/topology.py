"""Where each runner runs: in the entry's worker processes, in processes of its own, or remote.

The runner files declare one BentoML service per model family and one for the LLM. The entry
service declares each of them with `runner(name, Service, settings)`, which returns:

- `InProcess(Service)` for *in-process* (the default, fastest on a small box): the runner class
  is instantiated inside each entry worker on first access, exactly what BentoML's own
  `bentoml.depends` does for a dependency it has no URL for, but declared as such, so
  `bentoml serve` starts no process for it. `package_models` adds its class-scope models to the
  entry, so `bentoml build` still ships them.
- `bentoml.depends(Service)` for *separate*: `bentoml serve` starts the runner as processes of
  its own and the entry calls its API (with adaptive batching) over a local socket.
- `bentoml.depends(Service, url=...)` for *remote*: the runner is served elsewhere (its own
  Kubernetes Deployment, a machine with a GPU or Apple Silicon) at a URL from settings.

A runner with a URL in `TIFFIN_RUNNER_URLS` is remote whatever `TIFFIN_TOPOLOGY` says.
"""

from __future__ import annotations

from typing import Any, Literal

import bentoml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Mode = Literal["in-process", "separate", "remote"]
RUNNER_NAMES = (
    "card_fraud",
    "personalization",
    "fraud_detection",
    "ctr_prediction",
    "bid_optimization",
    "generic",
    "llm",
)


class TopologySettings(BaseSettings):
    """Runner placement."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_", extra="ignore")

    topology: Mode = "in-process"
    """`in-process`: runners inside each entry worker; `separate`: each runner in processes of
    its own under the same `bentoml serve`; `remote`: every runner at its URL."""

    runner_urls: dict[str, str] = Field(default_factory=dict)
    """Runner name -> base URL, as JSON: `{"llm": "http://tiffin-llm:3000"}`. Names:
    card_fraud, personalization, fraud_detection, ctr_prediction, bid_optimization, generic,
    llm. A runner listed here is remote in every mode."""

    runner_timeout_s: float = Field(10.0, gt=0, le=600)
    """How long a tabular prediction may wait on a separate or remote runner before the
    request fails with a 503 naming the runner (the LLM's own deadlines govern LLM calls)."""

    runner_startup_timeout_s: float = Field(120.0, ge=0, le=3600)
    """How long a starting entry worker waits for its separate or remote runners to be ready
    before it starts anyway (readiness stays non-200 and /health names the runner)."""

    @model_validator(mode="after")
    def _known_runners(self) -> TopologySettings:
        unknown = sorted(set(self.runner_urls) - set(RUNNER_NAMES))
        if unknown:
            raise ValueError(
                f"runner_urls: unknown runner {', '.join(unknown)}; "
                f"known: {', '.join(RUNNER_NAMES)}"
            )
        if self.topology == "remote":
            missing = [name for name in RUNNER_NAMES if name not in self.runner_urls]
            if missing:
                raise ValueError(
                    f"runner_urls: topology 'remote' needs a URL for {', '.join(missing)}"
                )
        return self

    def mode_of(self, name: str) -> Mode:
        if name in self.runner_urls:
            return "remote"
        return "separate" if self.topology == "separate" else "in-process"


class InProcess:
    """A runner service instantiated inside the entry worker that first reads the attribute."""

    def __init__(self, on: Any) -> None:
        self.on = on
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        runner = self.on()  # `Service.__call__` builds the class, as bentoml.depends would
        instance.__dict__[self.name] = runner  # later reads skip the descriptor
        return runner


def runner(name: str, service: Any, settings: TopologySettings, enabled: bool = True) -> Any:
    """The class-scope declaration of runner `name` in the entry service."""
    mode = settings.mode_of(name)
    if not enabled or mode == "in-process":
        return InProcess(service)
    if mode == "remote":
        return bentoml.depends(service, url=settings.runner_urls[name])
    return bentoml.depends(service)


def package_models(entry: Any) -> Any:
    """The class-scope models of in-process runners belong to the entry's Bento."""
    for attribute in vars(entry.inner).values():
        if not isinstance(attribute, InProcess):
            continue
        for service in attribute.on.all_services().values():
            for model in service.models:
                if model not in entry.models:
                    entry.models.append(model)
    return entry
