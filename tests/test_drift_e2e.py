"""Explanations and drift through the public HTTP interface of a real `bentoml serve` (two
workers, real Redis, really trained models)."""

from __future__ import annotations

import re
import time

import httpx
import numpy as np
import pytest

from models import datagen
from tests.conftest import Served
from tests.test_explain import body, check_explained, tree_rows
from tiffin import model_store
from tiffin.drift import DriftSettings
from tiffin.featurize import CARD_FRAUD_FEATURES

pytestmark = pytest.mark.e2e
NAMES = list(CARD_FRAUD_FEATURES)


def post(served: Served, path: str, payload: object) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=payload, timeout=30)


def test_explanations_over_http_equal_the_native_librarys(tiffin: Served) -> None:
    for family, version in (("card_fraud", "v1.0"), ("ctr_prediction", "1.0.0")):
        names = model_store.card_of(model_store.get(family, version)).feature_names
        rows = tree_rows(family, 20)
        response = post(tiffin, "/predict", body(family, names, rows, explain=True))
        assert response.status_code == 200, response.text
        check_explained(response.json(), family, version, rows)
    refused = post(
        tiffin,
        "/predict",
        {"model_name": "your_model", "features": {"feature1": [1], "feature2": [2]}, "explain": 1},
    )
    assert refused.status_code == 422 and refused.json()["error"].startswith("explain:")


def test_shifted_traffic_is_flagged_per_feature(tiffin: Served) -> None:
    rows = datagen.card_fraud_dataset(np.random.default_rng(2024), 1200)[0]
    shifted = rows.copy()
    amount = NAMES.index("transaction_amount")
    shifted[:, amount] *= 8.0  # every amount eight times larger; nothing else moves
    for batch in np.array_split(shifted, 12):
        answer = post(tiffin, "/predict", body("card_fraud", NAMES, batch, version="v1.0"))
        assert answer.status_code == 200, answer.text
    time.sleep(3 * DriftSettings().flush_interval_s)  # each worker adds its counts this late
    response = httpx.get(f"{tiffin.url}/drift/card_fraud", params={"version": "v1.0"}, timeout=30)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model"] == "card_fraud" and out["threshold"] == 0.2
    (version,) = out["versions"]
    assert version["version"] == "v1.0" and version["reference"]["rows"] > 1000
    features = {f["feature"]: f for f in version["features"]}
    assert set(features) == set(NAMES)
    # both workers served some of it; the reply sums the replica's workers
    assert features["transaction_amount"]["samples"] >= 1200
    assert features["transaction_amount"]["drifted"], features["transaction_amount"]
    assert features["transaction_amount"]["psi"] > 0.5
    for unshifted in ("card_age_days", "mcc_risk", "is_foreign_country"):
        assert not features[unshifted]["drifted"], features[unshifted]
        assert features[unshifted]["psi"] < 0.1
    assert version["score"]["samples"] >= 1200 and version["score"]["psi"] is not None
    # PromQL can alert on it: the gauge is on /metrics, per feature
    text = httpx.get(f"{tiffin.url}/metrics", timeout=30).text
    line = re.search(
        r'ml_feature_drift_psi\{feature="transaction_amount",model="card_fraud",version="v1.0"\} '
        r"(\S+)",
        text,
    )
    assert line is not None and float(line[1]) > 0.5
    assert 'ml_feature_bin_total{bin="' in text


def test_drift_errors_and_versions_without_reference(tiffin: Served) -> None:
    missing = httpx.get(f"{tiffin.url}/drift/no_such_model", timeout=30)
    assert missing.status_code == 404 and "no_such_model" in missing.json()["error"]
    bad_version = httpx.get(f"{tiffin.url}/drift/card_fraud", params={"version": "v9"}, timeout=30)
    assert bad_version.status_code == 404 and bad_version.json()["error"].startswith("version:")
    every = httpx.get(f"{tiffin.url}/drift/species_classifier", timeout=30).json()
    assert {v["version"] for v in every["versions"]} == {"v1", "v2", "v2-quantized"}
    assert all(v["reference"] is not None for v in every["versions"])


def test_a_version_saved_without_reference_answers_200_saying_so(tiffin: Served) -> None:
    import bentoml
    from sklearn.linear_model import LogisticRegression

    from models import importer
    from models.train import _sklearn_artifacts

    x, y = datagen.two_feature_dataset(np.random.default_rng(5), 500)
    onnx = _sklearn_artifacts(LogisticRegression().fit(x, y), 2)["model.onnx"]
    metadata = {"feature_names": ["feature1", "feature2"], "task": "binary"}
    importer.import_version("drift_noref", "1.0.0", {"model.onnx": onnx}, metadata)
    try:
        response = httpx.get(f"{tiffin.url}/drift/drift_noref", timeout=30)
        assert response.status_code == 200, response.text
        (version,) = response.json()["versions"]
        assert version["reference"] is None and "without reference" in version["reason"]
    finally:
        bentoml.models.delete("drift_noref:1.0.0")
