"""Any model a user brings (ONNX, XGBoost JSON, LightGBM text), addressed by name.

Serves seed 003's `/predict` for models without a dedicated runner and seed 004's
`/v1/models/predict`. The models declared here are the ones packaged into the Bento; any other
Tiffin model in the store is loaded on first use.
"""

from __future__ import annotations

from typing import Any

import bentoml
from bentoml.models import BentoModel

from tiffin.runner_base import MultiFamilyRunner, RunnerMetrics, runner_service_config


@bentoml.service(name="generic_runner", **runner_service_config())
class GenericRunner(MultiFamilyRunner):
    your_model = BentoModel("your_model:1.0.0")
    species_v1 = BentoModel("species_classifier:v1")
    species_v2 = BentoModel("species_classifier:v2")
    species_v2_quantized = BentoModel("species_classifier:v2-quantized")

    def declared(self) -> list[Any]:
        """Loaded at start-up: each family's default version."""
        return [self.your_model, self.species_v1]


GenericRunner.add_asgi_middleware(RunnerMetrics)  # type: ignore[attr-defined]
