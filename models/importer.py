"""Import user-brought models into the BentoML model store.

Accepted formats (pickle is not one of them: loading a pickle runs arbitrary code):
- seed 000's layout: `<dir>/<name>/<version>/model.onnx` + `metadata.json`;
- the same layout with `model.json` (XGBoost JSON) or `model.txt` (LightGBM text) instead;
- a single native file with `--file`, `--name`, `--version`, `--features`, `--task`.

An optional `reference.csv` beside the artifact (a header row of feature names, then numeric rows
of the data the model was trained on, or a representative sample; `--reference` for `--file`)
becomes the version's reference distributions for drift (`GET /drift/{model}`); without one the
version serves normally and `/drift` says it has no reference.

`metadata.json` holds at least `feature_names` (the column order) and `task` (`binary`,
`multiclass`, `regression` or `multi_output`); `framework`, `output_names`, `description` and
`metrics` are optional. Every artifact is loaded, shape-checked and warmed up *before* it is saved,
so a broken artifact never reaches the store. Native boosters are also converted to ONNX when the
conversion reproduces their predictions, because ONNX Runtime serves them much faster.

Usage: `python -m models.importer DIR` or `python -m models.importer --file F --name N ...`
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import ValidationError

from tiffin import model_store
from tiffin.drift import Reference, build_reference, reference_scores
from tiffin.errors import ModelLoadError
from tiffin.model_store import ARTIFACT_FILES, ModelCard
from tiffin.runtimes import load_artifacts

FORBIDDEN_SUFFIXES = {".pkl", ".pickle", ".joblib", ".sav"}
NATIVE_BY_FILE = {v: k for k, v in ARTIFACT_FILES.items()}
REFERENCE_FILE = "reference.csv"
REFERENCE_ROWS = 20_000
"""Rows a reference is computed from at most (a seeded sample of larger sets): quantiles and
shares are stable well before that, and scoring them is part of saving the version."""


def reference_of(card: ModelCard, artifacts: dict[str, bytes], rows: np.ndarray) -> Reference:
    """Reference distributions of `rows` and of the scores the version, loaded as it will be
    served, gives them."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != len(card.feature_names) or rows.shape[0] == 0:
        raise ModelLoadError(
            f"reference_rows: expected rows of {len(card.feature_names)} values "
            f"({', '.join(card.feature_names)}), got shape {list(rows.shape)}"
        )
    if rows.shape[0] > REFERENCE_ROWS:
        picked = np.random.default_rng(0).choice(rows.shape[0], REFERENCE_ROWS, replace=False)
        rows = rows[np.sort(picked)]
    with tempfile.TemporaryDirectory() as tmp:
        for fname, blob in artifacts.items():
            Path(tmp, fname).write_bytes(blob)
        served = load_artifacts(
            "reference", "check", Path(tmp), card.model_copy(update={"checksums": {}})
        )
        scores = reference_scores(served.predict(rows), card.task)
    return build_reference(rows, card.feature_names, scores)


def read_reference_csv(path: Path, feature_names: list[str]) -> np.ndarray:
    """`reference.csv` as rows in the model's feature order (columns matched by header)."""
    try:
        with path.open() as f:
            header = [h.strip() for h in f.readline().split(",")]
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} is not a numeric CSV with a header: {exc}") from exc
    missing = [f for f in feature_names if f not in header]
    if missing:
        raise ModelLoadError(f"{path.name}: missing columns {', '.join(missing)}")
    return table[:, [header.index(f) for f in feature_names]]


def write_metadata(directory: Path, **fields: Any) -> None:
    directory.joinpath("metadata.json").write_text(json.dumps(fields, indent=2))


def _artifacts_in(version_dir: Path) -> dict[str, bytes]:
    forbidden = [p.name for p in version_dir.iterdir() if p.suffix in FORBIDDEN_SUFFIXES]
    if forbidden:
        raise ModelLoadError(f"{', '.join(forbidden)}: pickle files are not an import format")
    found = {
        f: version_dir.joinpath(f).read_bytes()
        for f in NATIVE_BY_FILE
        if version_dir.joinpath(f).exists()
    }
    if not found:
        raise ModelLoadError(f"{version_dir} has none of {', '.join(NATIVE_BY_FILE)}")
    return found


def _card_from(metadata: dict[str, Any], name: str, artifacts: dict[str, bytes]) -> ModelCard:
    framework = metadata.get("framework") or next(
        (NATIVE_BY_FILE[f] for f in ("model.json", "model.txt") if f in artifacts), "onnx"
    )
    try:
        return ModelCard.model_validate(
            {
                **metadata,
                "family": metadata.get("family", name),
                "framework": framework,
                "source": "imported",
            }
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelLoadError(f"metadata.json is invalid: {problems}") from exc


def _try_onnx(card: ModelCard, artifacts: dict[str, bytes], native_dir: Path) -> bytes | None:
    """Convert a native booster to ONNX, kept only if it reproduces the native predictions."""
    if "model.onnx" in artifacts:
        return None
    from onnxmltools import convert_lightgbm, convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    n = len(card.feature_names)
    initial = [("input", FloatTensorType([None, n]))]
    native = load_artifacts("import-check", "native", native_dir, card)
    booster = getattr(native.explainer, "booster", None)
    try:
        if card.framework == "xgboost":
            onnx_model = convert_xgboost(booster, initial_types=initial, target_opset=15)
        else:
            onnx_model = convert_lightgbm(
                booster, initial_types=initial, zipmap=False, target_opset=15
            )
        blob = onnx_model.SerializeToString()
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "model.onnx").write_bytes(blob)
            converted = load_artifacts(
                "import-check", "onnx", Path(tmp), card.model_copy(update={"checksums": {}})
            )
        probe = np.random.default_rng(0).normal(0, 3, (64, n)).astype(np.float32)
        if np.allclose(converted.predict(probe), native.predict(probe), atol=1e-4):
            return blob
    except Exception:  # conversion is an optimisation; the native engine still serves
        return None
    return None


def import_version(
    name: str,
    version: str,
    artifacts: dict[str, bytes],
    metadata: dict[str, Any],
    force: bool = False,
    reference_rows: np.ndarray | None = None,
) -> str:
    """Check one version completely, then save it; on ModelLoadError nothing is saved.
    `reference_rows` (training data or a representative sample, in feature order) become the
    version's reference distributions for drift."""
    try:
        bentoml.Tag(name, version)
    except ValueError as exc:
        raise ModelLoadError(
            f"{name}:{version} is not a valid model name and version: {exc}"
        ) from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError("metadata.json must be a JSON object")
    if model_store.exists(name, version) and not force:
        raise ModelLoadError(f"{name}:{version} is already in the model store")
    card = _card_from(metadata, name, artifacts)
    with tempfile.TemporaryDirectory() as tmp:
        for fname, blob in artifacts.items():
            Path(tmp, fname).write_bytes(blob)
        checked = card.model_copy(
            update={"checksums": {f: model_store.sha256_bytes(b) for f, b in artifacts.items()}}
        )
        load_artifacts(name, version, Path(tmp), checked)
        onnx_blob = (
            _try_onnx(card, artifacts, Path(tmp))
            if card.framework in ("xgboost", "lightgbm")
            else None
        )
    if onnx_blob is not None:
        artifacts = {**artifacts, "model.onnx": onnx_blob}
    if reference_rows is not None:
        card.reference = reference_of(card, artifacts, reference_rows)
    if force and model_store.exists(name, version):
        bentoml.models.delete(f"{name}:{version}")
    return str(model_store.save(name, version, artifacts, card))


def import_directory(root: Path, force: bool = False) -> list[str]:
    """Import every `<root>/<name>/<version>/` found; stops at the first broken one."""
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory")
    tags: list[str] = []
    for version_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
        name, version = version_dir.parent.name, version_dir.name
        meta_path = version_dir / "metadata.json"
        if not meta_path.exists():
            raise ModelLoadError(f"{version_dir} has no metadata.json")
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{meta_path} is not valid JSON: {exc}") from exc
        if model_store.exists(name, version) and not force:
            continue
        try:
            reference_path = version_dir / REFERENCE_FILE
            reference = (
                read_reference_csv(reference_path, list(metadata.get("feature_names") or []))
                if reference_path.exists()
                else None
            )
            artifacts = _artifacts_in(version_dir)
            tags.append(import_version(name, version, artifacts, metadata, force, reference))
        except ModelLoadError as exc:
            done = f"; imported before it: {', '.join(tags)}" if tags else "; nothing was saved"
            raise ModelLoadError(f"{name}:{version}: {exc}{done}") from exc
    return tags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Import user models into the BentoML model store")
    parser.add_argument("directory", nargs="?", type=Path, help="a seed-000 layout directory")
    parser.add_argument(
        "--file", type=Path, help="a single model.onnx / XGBoost .json / LightGBM .txt"
    )
    parser.add_argument("--name")
    parser.add_argument("--version")
    parser.add_argument("--features", help="comma-separated feature names in column order")
    parser.add_argument("--task", default="binary")
    parser.add_argument(
        "--reference", type=Path, help="CSV of reference rows (header: feature names) for drift"
    )
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.directory:
            tags = import_directory(args.directory, args.force)
        elif args.file and args.name and args.version and args.features:
            suffix_to_file = {".onnx": "model.onnx", ".json": "model.json", ".txt": "model.txt"}
            if args.file.suffix not in suffix_to_file:
                raise ModelLoadError(
                    f"{args.file.name}: expected .onnx, .json (XGBoost) or .txt (LightGBM)"
                )
            names = [f.strip() for f in args.features.split(",")]
            metadata = {"feature_names": names, "task": args.task}
            artifacts = {suffix_to_file[args.file.suffix]: args.file.read_bytes()}
            reference = (
                read_reference_csv(args.reference, names) if args.reference is not None else None
            )
            tags = [
                import_version(args.name, args.version, artifacts, metadata, args.force, reference)
            ]
        else:
            parser.error("give a DIRECTORY, or --file with --name, --version and --features")
    except ModelLoadError as exc:
        print(f"import failed: {exc}", file=sys.stderr)
        return 2
    for tag in tags:
        print(f"imported {tag}")
    if not tags:
        print("nothing new to import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
