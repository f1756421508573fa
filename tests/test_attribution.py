"""The fast path attribution equals XGBoost's own (approx_contribs) on real trained models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from tiffin import model_store
from tiffin.runtimes import XGBoostPredictor


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
