"""Reproducible training pipelines: `python -m models.train [--only NAME] [--force]`.

Each pipeline draws generated data from a fixed seed, trains on 80%, reports AUC / RMSE / accuracy
on the held-out 20%, converts the model to ONNX for serving, and saves the version to the BentoML
model store with its card (feature names and order, metrics, data seed, framework, created-at).
A version already in the store is left alone unless `--force` is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, mean_squared_error, roc_auc_score
from sklearn.model_selection import train_test_split

from models import datagen
from tiffin import featurize as fz
from tiffin import model_store
from tiffin.model_store import ModelCard, Task
from tiffin.settings import model_settings

DATA_SEED = 20240902


def _onnx_input(n_features: int, converter: str = "skl2onnx") -> list:
    """Each converter insists on its own FloatTensorType class."""
    if converter == "onnxmltools":
        from onnxmltools.convert.common.data_types import FloatTensorType
    else:
        from skl2onnx.common.data_types import FloatTensorType

    return [("input", FloatTensorType([None, n_features]))]


def _xgboost_artifacts(model, n_features: int) -> dict[str, bytes]:
    from onnxmltools import convert_xgboost

    onnx_model = convert_xgboost(
        model, initial_types=_onnx_input(n_features, "onnxmltools"), target_opset=15
    )
    return {
        "model.onnx": onnx_model.SerializeToString(),
        "model.json": bytes(model.get_booster().save_raw(raw_format="json")),
    }


def _lightgbm_artifacts(model, n_features: int) -> dict[str, bytes]:
    from onnxmltools import convert_lightgbm

    onnx_model = convert_lightgbm(
        model, initial_types=_onnx_input(n_features, "onnxmltools"), zipmap=False, target_opset=15
    )
    return {
        "model.onnx": onnx_model.SerializeToString(),
        "model.txt": model.booster_.model_to_string().encode(),
    }


def _sklearn_artifacts(model, n_features: int) -> dict[str, bytes]:
    from skl2onnx import convert_sklearn

    options = {id(model): {"zipmap": False}} if hasattr(model, "predict_proba") else None
    onnx_model = convert_sklearn(
        model, initial_types=_onnx_input(n_features), options=options, target_opset=15
    )
    return {"model.onnx": onnx_model.SerializeToString()}


@dataclass
class Trained:
    artifacts: dict[str, bytes]
    metrics: dict[str, float]
    reference_rows: np.ndarray | None = None
    """The training rows: the version's reference distributions for drift are computed from
    them (tiffin.drift)."""


def _split(x: np.ndarray, y: np.ndarray, stratify: bool = True):
    return train_test_split(
        x, y, test_size=0.2, random_state=DATA_SEED, stratify=y if stratify else None
    )


def train_card_fraud(rows: int) -> Trained:
    from xgboost import XGBClassifier

    x, y = datagen.card_fraud_dataset(np.random.default_rng(DATA_SEED), rows)
    x_tr, x_te, y_tr, y_te = _split(x, y)
    model = XGBClassifier(
        n_estimators=150,
        max_depth=5,
        learning_rate=0.08,
        subsample=0.9,
        scale_pos_weight=float((y_tr == 0).sum() / max((y_tr == 1).sum(), 1)) ** 0.5,
        n_jobs=2,
        random_state=DATA_SEED,
        eval_metric="auc",
    )
    model.fit(x_tr, y_tr)
    auc = roc_auc_score(y_te, model.predict_proba(x_te)[:, 1])
    return Trained(
        _xgboost_artifacts(model, x.shape[1]),
        {"auc": auc, "positive_rate": float(y.mean())},
        x_tr,
    )


def train_ad_fraud(rows: int) -> Trained:
    from xgboost import XGBClassifier

    x, y = datagen.ad_fraud_dataset(np.random.default_rng(DATA_SEED + 1), rows)
    x_tr, x_te, y_tr, y_te = _split(x, y)
    model = XGBClassifier(
        n_estimators=120, max_depth=4, learning_rate=0.1, n_jobs=2, random_state=DATA_SEED
    )
    model.fit(x_tr, y_tr)
    auc = roc_auc_score(y_te, model.predict_proba(x_te)[:, 1])
    return Trained(
        _xgboost_artifacts(model, x.shape[1]),
        {"auc": auc, "positive_rate": float(y.mean())},
        x_tr,
    )


def train_ctr(rows: int) -> Trained:
    from lightgbm import LGBMClassifier

    x, y = datagen.ctr_dataset(np.random.default_rng(DATA_SEED + 2), rows)
    x_tr, x_te, y_tr, y_te = _split(x, y)
    model = LGBMClassifier(
        n_estimators=150,
        num_leaves=31,
        learning_rate=0.05,
        min_child_samples=40,
        n_jobs=2,
        random_state=DATA_SEED,
        verbose=-1,
    )
    model.fit(x_tr, y_tr)
    auc = roc_auc_score(y_te, np.asarray(model.predict_proba(x_te))[:, 1])
    return Trained(
        _lightgbm_artifacts(model, x.shape[1]),
        {"auc": auc, "positive_rate": float(y.mean())},
        x_tr,
    )


def train_bid(rows: int) -> Trained:
    from sklearn.ensemble import GradientBoostingRegressor

    x, y = datagen.bid_dataset(np.random.default_rng(DATA_SEED + 3), rows)
    x_tr, x_te, y_tr, y_te = _split(x, y, stratify=False)
    model = GradientBoostingRegressor(n_estimators=120, max_depth=4, random_state=DATA_SEED)
    model.fit(x_tr, y_tr)
    rmse = float(np.sqrt(mean_squared_error(y_te, model.predict(x_te))))
    return Trained(
        _sklearn_artifacts(model, x.shape[1]),
        {"rmse": rmse, "target_mean": float(y.mean())},
        x_tr,
    )


def train_personalization(rows: int) -> Trained:
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = datagen.personalization_dataset(np.random.default_rng(DATA_SEED + 4), rows)
    x_tr, x_te, y_tr, y_te = _split(x, y, stratify=False)
    model = make_pipeline(
        StandardScaler(),
        MLPRegressor(
            hidden_layer_sizes=(32, 16), max_iter=200, early_stopping=True, random_state=DATA_SEED
        ),
    )
    model.fit(x_tr, y_tr)
    pred = np.clip(model.predict(x_te), 0, 1)
    metrics = {
        f"rmse_{name}": float(np.sqrt(mean_squared_error(y_te[:, i], pred[:, i])))
        for i, name in enumerate(fz.PERSONALIZATION_OUTPUTS)
    }
    return Trained(_sklearn_artifacts(model, x.shape[1]), metrics, x_tr)


def _species_split():
    x, y = datagen.species_dataset(np.random.default_rng(DATA_SEED + 5), 3000)
    return _split(x, y)


def train_species_v1(rows: int) -> Trained:
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te, y_tr, y_te = _species_split()
    model = LogisticRegression(max_iter=500).fit(x_tr, y_tr)
    acc = accuracy_score(y_te, model.predict(x_te))
    return Trained(_sklearn_artifacts(model, x_tr.shape[1]), {"accuracy": acc}, x_tr)


def _species_mlp():
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_tr, x_te, y_tr, y_te = _species_split()
    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=400, random_state=DATA_SEED),
    ).fit(x_tr, y_tr)
    return model, x_tr, x_te, y_te


def train_species_v2(rows: int) -> Trained:
    model, x_tr, x_te, y_te = _species_mlp()
    acc = accuracy_score(y_te, model.predict(x_te))
    return Trained(_sklearn_artifacts(model, x_te.shape[1]), {"accuracy": acc}, x_tr)


def train_species_v2_quantized(rows: int) -> Trained:
    """v2's network with int8 weights (onnxruntime dynamic quantization): ~4x smaller weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tiffin.runtimes import OnnxPredictor

    model, x_tr, x_te, y_te = _species_mlp()
    artifacts = _sklearn_artifacts(model, x_te.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(artifacts["model.onnx"])
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        quantized = dst.read_bytes()
        probs = OnnxPredictor("multiclass").load(dst).predict(x_te)
    acc = accuracy_score(y_te, probs.argmax(axis=1))
    return Trained(
        {"model.onnx": quantized},
        {"accuracy": acc, "fp32_bytes": len(artifacts["model.onnx"]), "int8_bytes": len(quantized)},
        x_tr,
    )


@dataclass
class Pipeline:
    name: str
    version: str
    framework: str
    task: Task
    feature_names: tuple[str, ...]
    output_names: tuple[str, ...]
    train: Callable[[int], Trained]
    description: str


PIPELINES: tuple[Pipeline, ...] = (
    Pipeline(
        "fraud_detection",
        "1.0.0",
        "xgboost",
        "binary",
        fz.AD_FRAUD_FEATURES,
        ("fraud",),
        train_ad_fraud,
        "Ad click fraud (seed 000 /predict/fraud)",
    ),
    Pipeline(
        "ctr_prediction",
        "1.0.0",
        "lightgbm",
        "binary",
        fz.CTR_FEATURES,
        ("click",),
        train_ctr,
        "Click-through rate (seed 000 /predict/ctr)",
    ),
    Pipeline(
        "bid_optimization",
        "1.0.0",
        "sklearn",
        "regression",
        fz.BID_FEATURES,
        ("optimal_bid_cpm",),
        train_bid,
        "Optimal bid CPM (seed 000 /predict/bid)",
    ),
    Pipeline(
        "card_fraud",
        "v1.0",
        "xgboost",
        "binary",
        fz.CARD_FRAUD_FEATURES,
        ("fraud",),
        train_card_fraud,
        "Card transaction fraud (seed 001 /score/fraud)",
    ),
    Pipeline(
        "personalization",
        "v1.0",
        "sklearn",
        "multi_output",
        fz.PERSONALIZATION_FEATURES,
        fz.PERSONALIZATION_OUTPUTS,
        train_personalization,
        "Relevance, conversion and engagement (seed 001 /score/personalization)",
    ),
    Pipeline(
        "species_classifier",
        "v1",
        "sklearn",
        "multiclass",
        datagen.SPECIES_FEATURES,
        datagen.SPECIES,
        train_species_v1,
        "Flower species, logistic regression (seed 004)",
    ),
    Pipeline(
        "species_classifier",
        "v2",
        "sklearn",
        "multiclass",
        datagen.SPECIES_FEATURES,
        datagen.SPECIES,
        train_species_v2,
        "Flower species, MLP (seed 004)",
    ),
    Pipeline(
        "species_classifier",
        "v2-quantized",
        "onnx",
        "multiclass",
        datagen.SPECIES_FEATURES,
        datagen.SPECIES,
        train_species_v2_quantized,
        "Flower species, MLP with int8 weights (seed 004)",
    ),
)


def run_pipeline(p: Pipeline, rows: int) -> str:
    from models.importer import reference_of

    result = p.train(rows)
    card = ModelCard(
        family=p.name,
        framework=p.framework,
        task=p.task,
        feature_names=list(p.feature_names),
        output_names=list(p.output_names),
        metrics={k: round(float(v), 6) for k, v in result.metrics.items()},
        data_seed=DATA_SEED,
        description=p.description,
    )
    if result.reference_rows is not None:
        card.reference = reference_of(card, result.artifacts, result.reference_rows)
    tag = model_store.save(p.name, p.version, result.artifacts, card)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in card.metrics.items())
    return f"{tag} ({shown})"


def import_example_model() -> str:
    """`your_model` (seed 003's example): a user-style ONNX model imported through the importer."""
    from sklearn.linear_model import LogisticRegression

    from models import importer

    x, y = datagen.two_feature_dataset(np.random.default_rng(DATA_SEED + 6), 4000)
    model = LogisticRegression().fit(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        version_dir = Path(tmp, "your_model", "1.0.0")
        version_dir.mkdir(parents=True)
        version_dir.joinpath("model.onnx").write_bytes(_sklearn_artifacts(model, 2)["model.onnx"])
        # the training rows, as a user would ship them: the version's reference for drift
        np.savetxt(
            version_dir / importer.REFERENCE_FILE,
            x,
            delimiter=",",
            header="feature1,feature2",
            comments="",
        )
        importer.write_metadata(
            version_dir,
            framework="sklearn",
            task="binary",
            feature_names=["feature1", "feature2"],
            output_names=["class_0", "class_1"],
            description="Seed 003's example model",
        )
        tags = importer.import_directory(Path(tmp))
    return ", ".join(str(t) for t in tags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="train only this model name (repeatable)")
    parser.add_argument("--force", action="store_true", help="retrain versions already stored")
    parser.add_argument("--rows", type=int, default=None, help="rows of generated data per model")
    args = parser.parse_args(argv)
    rows = args.rows or model_settings().train_rows
    todo = [p for p in PIPELINES if not args.only or p.name in args.only]
    started = time.perf_counter()
    for i, p in enumerate(todo, 1):
        prefix = f"[{i}/{len(todo) + 1}] {p.name}:{p.version}"
        if model_store.exists(p.name, p.version) and not args.force:
            print(f"{prefix} already in the model store, kept", flush=True)
            continue
        if args.force and model_store.exists(p.name, p.version):
            import bentoml

            bentoml.models.delete(f"{p.name}:{p.version}")
        t0 = time.perf_counter()
        print(f"{prefix} training {p.framework} on {rows} generated rows ...", flush=True)
        print(
            f"{prefix} saved {run_pipeline(p, rows)} in {time.perf_counter() - t0:.1f}s", flush=True
        )
    if not args.only or "your_model" in args.only:
        prefix = f"[{len(todo) + 1}/{len(todo) + 1}] your_model:1.0.0"
        if model_store.exists("your_model", "1.0.0"):
            print(f"{prefix} already in the model store, kept", flush=True)
        else:
            print(f"{prefix} imported {import_example_model()}", flush=True)
    print(f"done in {time.perf_counter() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
