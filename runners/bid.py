"""scikit-learn optimal bid CPM (seed 000 /predict/bid)."""

from __future__ import annotations

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import RunnerMetrics, TabularRunner, runner_service_config


@bentoml.service(name="bid_optimization_runner", **runner_service_config())
class BidRunner(TabularRunner):
    model = BentoModel("bid_optimization:1.0.0")


BidRunner.add_asgi_middleware(RunnerMetrics)  # type: ignore[attr-defined]
