"""`explain: true` on seed 003's `/predict`, in process over the real application and really
trained models: contributions equal the native libraries' own, by the card's feature names;
models without an explainer are a 422 naming `explain`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models import datagen
from tiffin import model_store
from tiffin.app import TiffinApp, local_app

Post = Callable[[str, dict[str, Any]], httpx.Response]


@pytest.fixture(scope="module")
def app(model_store: str) -> TiffinApp:
    return local_app()


@pytest.fixture(scope="module")
def post(app: TiffinApp) -> Post:
    def call(path: str, body: dict[str, Any]) -> httpx.Response:
        async def once() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://tiffin") as client:
                return await client.post(path, json=body)

        return asyncio.run(once())

    return call


def tree_rows(family: str, n: int = 40) -> np.ndarray:
    """Realistic rows for a family (a seed the models were not trained on)."""
    rng = np.random.default_rng(99)
    make = {
        "card_fraud": datagen.card_fraud_dataset,
        "fraud_detection": datagen.ad_fraud_dataset,
        "ctr_prediction": datagen.ctr_dataset,
    }[family]
    return make(rng, n)[0].astype(np.float32)


def native_contributions(family: str, version: str, rows: np.ndarray) -> np.ndarray:
    """(n, features + 1) contributions, bias last, from the stored native model's own library."""
    directory = Path(model_store.get(family, version).path)
    if directory.joinpath("model.json").exists():
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(directory / "model.json"))
        # Tiffin's explainer is path (Saabas) attribution: XGBoost's `approx_contribs=True`
        return np.asarray(
            booster.predict(xgb.DMatrix(rows), pred_contribs=True, approx_contribs=True)
        )
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(directory / "model.txt"))
    return np.asarray(booster.predict(rows, pred_contrib=True))


def check_explained(answer: dict[str, Any], family: str, version: str, rows: np.ndarray) -> None:
    """The answer's explanations against the native library on the same rows."""
    card = model_store.card_of(model_store.get(family, version))
    native = native_contributions(family, version, rows)
    explained = answer["explanations"]
    assert explained["method"] == ("path" if card.framework == "xgboost" else "tree_shap")
    assert len(explained["rows"]) == len(rows)
    for i, row in enumerate(explained["rows"]):
        by_name = {c["feature"]: c["contribution"] for c in row["contributions"]}
        assert set(by_name) == set(card.feature_names)  # every feature, by the card's names
        ours = np.asarray([by_name[name] for name in card.feature_names])
        np.testing.assert_allclose(ours, native[i, :-1], atol=2e-4, rtol=1e-3)
        assert row["base_value"] == pytest.approx(native[i, -1], abs=2e-3)
        magnitudes = [abs(c["contribution"]) for c in row["contributions"]]
        assert magnitudes == sorted(magnitudes, reverse=True)


def body(family: str, names: list[str], rows: np.ndarray, **extra: Any) -> dict[str, Any]:
    columns = {name: rows[:, j].astype(float).tolist() for j, name in enumerate(names)}
    return {"model_name": family, "features": columns, **extra}


@pytest.mark.parametrize(
    ("family", "version"),
    [("card_fraud", "v1.0"), ("fraud_detection", "1.0.0"), ("ctr_prediction", "1.0.0")],
)
def test_contributions_equal_the_native_librarys(post: Post, family: str, version: str) -> None:
    names = model_store.card_of(model_store.get(family, version)).feature_names
    rows = tree_rows(family)
    response = post("/predict", body(family, names, rows, explain=True))
    assert response.status_code == 200, response.text
    answer = response.json()
    check_explained(answer, family, version, rows)
    # the scores are those of the same request without explanations
    plain = post("/predict", body(family, names, rows)).json()
    assert "explanations" not in plain  # seed 003's body, unchanged when not asked for
    np.testing.assert_allclose(
        answer["probabilities"]["class_1"], plain["probabilities"]["class_1"], atol=1e-5
    )


def test_card_fraud_explanations_add_its_risk_factor_groups(post: Post) -> None:
    from tiffin.featurize import CARD_RISK_FACTORS

    names = model_store.card_of(model_store.get("card_fraud", "v1.0")).feature_names
    rows = tree_rows("card_fraud", 5)
    out = post("/predict", body("card_fraud", names, rows, explain=True)).json()
    for row in out["explanations"]["rows"]:
        by_name = {c["feature"]: c["contribution"] for c in row["contributions"]}
        assert set(row["factor_groups"]) == set(CARD_RISK_FACTORS)
        for group, members in CARD_RISK_FACTORS.items():
            assert row["factor_groups"][group] == pytest.approx(
                sum(by_name[m] for m in members), abs=1e-5
            )


@pytest.mark.parametrize(
    ("family", "names"),
    [
        ("your_model", ["feature1", "feature2"]),  # imported ONNX
        ("species_classifier", list(datagen.SPECIES_FEATURES)),  # scikit-learn MLP / logistic
        ("bid_optimization", None),  # scikit-learn gradient boosting, served as ONNX only
    ],
)
def test_a_model_without_an_explainer_is_a_422_naming_explain(
    post: Post, family: str, names: list[str] | None
) -> None:
    names = names or model_store.card_of(model_store.get(family)).feature_names
    columns = {name: [1.0] for name in names}
    response = post("/predict", {"model_name": family, "features": columns, "explain": True})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("explain:")
    # without `explain` the same request is answered
    assert post("/predict", {"model_name": family, "features": columns}).status_code == 200


def test_explain_must_be_a_boolean(post: Post) -> None:
    response = post(
        "/predict", {"model_name": "card_fraud", "features": {"a": [1]}, "explain": "x"}
    )
    assert response.status_code == 400 and "explain" in response.json()["error"]
