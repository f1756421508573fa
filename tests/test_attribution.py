"""The compiled path attribution equals XGBoost's own (approx_contribs) on real trained models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from tiffin import model_store
from tiffin.errors import ModelLoadError
from tiffin.runtimes import XGBoostPredictor, load_artifacts


@pytest.mark.parametrize("name", ["card_fraud", "fraud_detection"])
def test_path_attribution_matches_xgboost(model_store_ready: None, name: str) -> None:
    predictor = XGBoostPredictor("binary").load(Path(model_store.get(name).path, "model.json"))
    x = np.random.default_rng(3).normal(2, 4, (400, predictor.n_features)).astype(np.float32)
    x[::5, 1] = np.nan  # missing values follow each split's default direction
    reference = predictor.booster.predict(xgb.DMatrix(x), pred_contribs=True, approx_contribs=True)[
        :, :-1
    ]
    np.testing.assert_allclose(predictor.contributions(x), reference, atol=1e-4)
    # contributions plus the bias reproduce the margin, so they explain this very prediction
    margin = predictor.booster.predict(xgb.DMatrix(x), output_margin=True)
    bias = predictor.booster.predict(xgb.DMatrix(x), pred_contribs=True, approx_contribs=True)[
        :, -1
    ]
    np.testing.assert_allclose(predictor.contributions(x).sum(axis=1) + bias, margin, atol=1e-3)


@pytest.fixture
def model_store_ready(model_store: str) -> None:
    return None


def test_serving_a_model_with_onnx_never_imports_xgboost(model_store_ready: None) -> None:
    """XGBoost's shared library costs ~100 MB of RSS per worker; explanations come from the JSON."""
    probe = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from tiffin import model_store\n"
        "from tiffin.runtimes import load_artifacts\n"
        "stored = model_store.get('card_fraud')\n"
        "card = model_store.card_of(stored)\n"
        "model = load_artifacts('card_fraud', 'x', Path(stored.path), card)\n"
        "x = np.ones((4, model.n_features), dtype=np.float32)\n"
        "assert model.explainer.contributions(x).shape == x.shape\n"
        "print(sorted(m for m in ('xgboost', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_malformed_model_json_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text('{"learner": {"gradient_booster": {}}}')
    with pytest.raises(ModelLoadError, match=r"model\.json is not a loadable XGBoost model"):
        XGBoostPredictor("binary").load(tmp_path / "model.json")


@pytest.mark.parametrize("name", ["card_fraud", "fraud_detection"])
def test_one_pass_scores_equal_the_onnx_engine_and_xgboost(
    model_store_ready: None, name: str
) -> None:
    """Scoring and explaining in one walk of the trees must not change a single score."""
    stored = model_store.get(name)
    model = load_artifacts(name, "t", Path(stored.path), model_store.card_of(stored))
    assert model.one_pass is not None
    x = np.random.default_rng(8).normal(1, 50, (500, model.n_features)).astype(np.float32)
    x[::9, 2] = np.nan
    scores, contributions = model.predict_explained(x)
    np.testing.assert_allclose(scores, model.predict(x), atol=1e-5)
    booster = model.explainer.booster  # type: ignore[union-attr]
    np.testing.assert_allclose(scores, booster.inplace_predict(x), atol=1e-5)
    np.testing.assert_allclose(contributions, model.explainer.contributions(x), atol=1e-6)  # type: ignore[union-attr]
