"""LightGBM click-through rate (seed 000 /predict/ctr)."""

from __future__ import annotations

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import RunnerMetrics, TabularRunner, runner_service_config


@bentoml.service(name="ctr_prediction_runner", **runner_service_config())
class CtrRunner(TabularRunner):
    model = BentoModel("ctr_prediction:1.0.0")


CtrRunner.add_asgi_middleware(RunnerMetrics)  # type: ignore[attr-defined]
