"""XGBoost card-transaction fraud (seed 001), with per-prediction contributions."""

from __future__ import annotations

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import RunnerMetrics, TabularRunner, runner_service_config


@bentoml.service(name="card_fraud_runner", **runner_service_config())
class CardFraudRunner(TabularRunner):
    model = BentoModel("card_fraud:v1.0")


CardFraudRunner.add_asgi_middleware(RunnerMetrics)  # type: ignore[attr-defined]
