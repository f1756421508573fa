"""`bentoml build` from the repository packages the service and every default model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bentoml

from tests.conftest import REPO

DEFAULT_MODELS = {
    "card_fraud:v1.0",
    "personalization:v1.0",
    "fraud_detection:1.0.0",
    "ctr_prediction:1.0.0",
    "bid_optimization:1.0.0",
    "your_model:1.0.0",
    "species_classifier:v1",
    "species_classifier:v2",
    "species_classifier:v2-quantized",
}


def test_bentoml_build_includes_the_models(model_store: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", ".", "--output", "tag"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = bentoml.get(tag)
    packaged = {str(m.tag) for m in bento.info.all_models}
    assert packaged >= DEFAULT_MODELS, DEFAULT_MODELS - packaged
    # /dashboard's static files ship in the Bento, not only its Python
    src = Path(bento.path) / "src" / "tiffin" / "dashboard"
    assert {p.name for p in src.iterdir()} >= {"index.html", "app.js", "style.css"}
