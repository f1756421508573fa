"""scikit-learn MLP relevance, conversion and engagement (seed 001)."""

from __future__ import annotations

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import RunnerMetrics, TabularRunner, runner_service_config


@bentoml.service(name="personalization_runner", **runner_service_config())
class PersonalizationRunner(TabularRunner):
    model = BentoModel("personalization:v1.0")


PersonalizationRunner.add_asgi_middleware(RunnerMetrics)  # type: ignore[attr-defined]
