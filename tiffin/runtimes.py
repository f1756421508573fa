"""Inference runtimes: one small class per framework, each with `load()` and `predict()`.

`predict` always returns float32 scores in one shape per task, whatever the engine:
binary -> (n,) probability of the positive class; multiclass -> (n, k) probabilities;
regression -> (n,); multi_output -> (n, m).

Serving uses ONNX Runtime whenever the version carries `model.onnx` (a single-row tree prediction
costs ~15 us there against ~300 us in XGBoost's Python API; figures in docs/benchmarks.md). The
native models are kept for what ONNX cannot do directly: per-prediction feature contributions
(for XGBoost compiled into a second ONNX ensemble, `tiffin.attribution`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tiffin.errors import ModelLoadError
from tiffin.model_store import ARTIFACT_FILES, ModelCard, sha256_bytes


class Predictor(Protocol):
    def predict(self, features: np.ndarray) -> np.ndarray: ...


class Explainer(Protocol):
    def contributions(self, features: np.ndarray) -> np.ndarray:
        """(n, n_features) additive contributions to the raw margin (bias column dropped)."""
        ...


def _as_task_output(raw: np.ndarray, task: str, n_rows: int) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float32)
    if task == "binary":
        return raw[:, 1] if raw.ndim == 2 and raw.shape[1] == 2 else raw.reshape(-1)
    if task == "regression":
        return raw.reshape(-1)
    # skl2onnx flattens multi-output regressors to (n * m, 1); rows are what we know for sure.
    return raw.reshape(n_rows, -1)


class OnnxPredictor:
    """ONNX Runtime with one intra-op thread: a request is tiny, and workers are the parallelism."""

    def __init__(self, task: str) -> None:
        self.task = task
        self._session: Any = None

    def load(self, path: Path) -> OnnxPredictor:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"model.onnx cannot be loaded: {exc}") from exc
        self._session = session
        self._input = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        wants_probabilities = self.task in ("binary", "multiclass")
        prob_outputs = [o for o in outputs if "prob" in o.lower()]
        self._output = (
            prob_outputs[0]
            if wants_probabilities and prob_outputs
            else outputs[-1 if wants_probabilities else 0]
        )
        shape = session.get_inputs()[0].shape
        self.n_features = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        raw = self._session.run([self._output], {self._input: features})[0]
        if isinstance(raw, list):  # a ZipMap output: list of {class: probability}
            raw = np.asarray([[row[k] for k in sorted(row)] for row in raw], dtype=np.float32)
        return _as_task_output(raw, self.task, features.shape[0])


class XGBoostPredictor:
    """Native XGBoost: serving for user models without an ONNX artifact, and explanations.

    Explanations need only the model's JSON (`tiffin.attribution`), so the booster, and with it
    XGBoost's ~100 MB shared library, is loaded on the first native prediction: a version served
    by ONNX Runtime never pays for it.
    """

    def __init__(self, task: str) -> None:
        self.task = task

    def load(self, path: Path) -> XGBoostPredictor:
        from tiffin.attribution import TreeAttribution

        self.path = path
        try:
            self.attribution = TreeAttribution.from_xgboost_json(path.read_bytes())
        except Exception as exc:  # a malformed document or a tree ONNX Runtime refuses
            raise ModelLoadError(f"{path.name} is not a loadable XGBoost model: {exc}") from exc
        self.n_features = self.attribution.n_features
        return self

    @functools.cached_property
    def booster(self) -> Any:
        import xgboost as xgb

        try:
            booster = xgb.Booster()
            booster.load_model(str(self.path))
        except Exception as exc:
            raise ModelLoadError(
                f"{self.path.name} is not a loadable XGBoost model: {exc}"
            ) from exc
        booster.set_param({"nthread": 1})
        return booster

    def predict(self, features: np.ndarray) -> np.ndarray:
        return _as_task_output(self.booster.inplace_predict(features), self.task, features.shape[0])

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """Path (Saabas) attribution, ~100x cheaper than TreeSHAP; see tiffin.attribution."""
        return self.attribution.contributions(features)


class LightGBMPredictor:
    """Native LightGBM: serving for user models without an ONNX artifact, and explanations.

    Importing lightgbm pulls in scikit-learn and SciPy (~80 MB of RSS per worker), so the booster
    is loaded on the first native prediction or contribution; `load` reads the text model's header.
    """

    def __init__(self, task: str) -> None:
        self.task = task

    def load(self, path: Path) -> LightGBMPredictor:
        self.path = path
        try:
            with path.open("rb") as text:
                header = dict(
                    line.decode().strip().split("=", 1)
                    for line in itertools.islice(text, 64)
                    if b"=" in line
                )
            self.n_features = int(header["max_feature_idx"]) + 1
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path.name} is not a LightGBM text model: {exc}") from exc
        return self

    @functools.cached_property
    def booster(self) -> Any:
        import lightgbm as lgb

        try:
            return lgb.Booster(model_file=str(self.path))
        except Exception as exc:
            problem = f"{self.path.name} is not a loadable LightGBM model: {exc}"
            raise ModelLoadError(problem) from exc

    def predict(self, features: np.ndarray) -> np.ndarray:
        return _as_task_output(
            np.asarray(self.booster.predict(features, num_threads=1)), self.task, features.shape[0]
        )

    def contributions(self, features: np.ndarray) -> np.ndarray:
        contribs = self.booster.predict(features, pred_contrib=True, num_threads=1)
        return np.asarray(contribs)[:, :-1]


_NATIVE = {"xgboost": XGBoostPredictor, "lightgbm": LightGBMPredictor}


@dataclass
class LoadedModel:
    """One model version ready to serve."""

    name: str
    version: str
    card: ModelCard
    predictor: Predictor
    explainer: Explainer | None
    one_pass: Any = None
    """An explainer whose `scores_and_contributions` was checked at load to reproduce
    `predictor`'s scores: scoring and explaining then walk the trees once, not twice."""

    @property
    def n_features(self) -> int:
        return len(self.card.feature_names)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.predictor.predict(features)

    def predict_explained(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and per-feature contributions (zeros without an explainer)."""
        if self.one_pass is not None:
            return self.one_pass.scores_and_contributions(features)
        if self.explainer is None:
            return self.predict(features), np.zeros_like(features)
        return self.predict(features), self.explainer.contributions(features)


def verify_checksums(directory: Path, card: ModelCard) -> None:
    for fname, expected in card.checksums.items():
        path = directory / fname
        if not path.exists():
            raise ModelLoadError(f"artifact {fname} is missing")
        if sha256_bytes(path.read_bytes()) != expected:
            raise ModelLoadError(f"artifact {fname} does not match its recorded checksum")


def load_artifacts(name: str, version: str, directory: Path, card: ModelCard) -> LoadedModel:
    """Load a version's artifacts, check them against its card, and warm it up once."""
    verify_checksums(directory, card)
    native: XGBoostPredictor | LightGBMPredictor | None = None
    native_classes: dict[str, Any] = _NATIVE
    # Only artifacts the card vouches for are loaded: a file dropped in later is ignored.
    vouched = set(card.checksums) if card.checksums else None
    for framework, cls in native_classes.items():
        path = directory / ARTIFACT_FILES[framework]
        if path.exists() and (vouched is None or path.name in vouched):
            native = cls(card.task).load(path)
    onnx_path = directory / ARTIFACT_FILES["onnx"]
    predictor: Predictor
    if onnx_path.exists() and (vouched is None or onnx_path.name in vouched):
        predictor = OnnxPredictor(card.task).load(onnx_path)
    elif native is not None:
        predictor = native
    else:
        raise ModelLoadError(f"{name}:{version} has no model.onnx, model.json or model.txt")
    declared = len(card.feature_names)
    for engine in (predictor, native):
        found = getattr(engine, "n_features", None)
        if found is not None and found != declared:
            raise ModelLoadError(
                f"{name}:{version} expects {found} features but its metadata names {declared}"
            )
    model = LoadedModel(name, version, card, predictor, native)
    try:
        model.predict(np.zeros((1, declared), dtype=np.float32))
    except Exception as exc:
        raise ModelLoadError(f"{name}:{version} failed its warm-up prediction: {exc}") from exc
    model.one_pass = _checked_one_pass(model)
    return model


def _checked_one_pass(model: LoadedModel) -> Any:
    """The explainer, when its one-pass scores equal the serving engine's on probe rows."""
    attribution = getattr(model.explainer, "attribution", None)
    scored_by_margin = model.card.task in ("binary", "regression")
    if attribution is None or attribution.base_margin is None or not scored_by_margin:
        return None
    rng = np.random.default_rng(0)
    probe = np.concatenate(
        [rng.normal(0, scale, (64, model.n_features)) for scale in (1, 10, 1000)]
    ).astype(np.float32)
    probe[::7, 0] = np.nan  # missing values take each split's default branch in both engines
    try:
        scores, _ = attribution.scores_and_contributions(probe)
        if np.allclose(scores, model.predict(probe), rtol=1e-4, atol=1e-5):
            return attribution
    except Exception:  # a cheaper path that is not exact is simply not used
        return None
    return None
