"""XGBoost ad click fraud (seed 000 /predict/fraud)."""

from __future__ import annotations

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import TabularRunner


@bentoml.service(name="fraud_detection_runner", workers=1)
class AdFraudRunner(TabularRunner):
    model = BentoModel("fraud_detection:1.0.0")
