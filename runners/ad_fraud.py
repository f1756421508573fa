"""XGBoost ad click fraud (seed 000 /predict/fraud)."""

from __future__ import annotations

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import RunnerMetrics, TabularRunner, runner_service_config


@bentoml.service(name="fraud_detection_runner", **runner_service_config())
class AdFraudRunner(TabularRunner):
    model = BentoModel("fraud_detection:1.0.0")


AdFraudRunner.add_asgi_middleware(RunnerMetrics)  # type: ignore[attr-defined]
