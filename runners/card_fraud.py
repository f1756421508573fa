"""XGBoost card-transaction fraud (seed 001), with per-prediction contributions."""

from __future__ import annotations

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import TabularRunner


@bentoml.service(name="card_fraud_runner", workers=1)
class CardFraudRunner(TabularRunner):
    model = BentoModel("card_fraud:v1.0")
