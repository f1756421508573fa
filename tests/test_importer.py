"""The model importer, through its public functions and its CLI, on artifacts trained here.

Every test trains a tiny real model (sklearn -> ONNX, XGBoost JSON, LightGBM text) on seeded random
data, imports it into the session's private BentoML store and checks what was, or was not, saved.
Model names carry a uuid because the store is shared by the whole session.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import importer
from tiffin import model_store as store
from tiffin.errors import ModelLoadError
from tiffin.model_pool import ModelPool

N_FEATURES = 5
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
VERSION = "1.0.0"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def dataset(seed: int = 7, rows: int = 600) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, N_FEATURES)).astype(np.float32)
    weights = np.asarray([1.5, -2.0, 0.7, 0.0, 1.1])
    y = (x @ weights + rng.normal(0, 0.5, rows) > 0).astype(np.int64)
    return x, y


def probe_rows(n_features: int = N_FEATURES) -> np.ndarray:
    return np.random.default_rng(99).normal(0, 2, (200, n_features)).astype(np.float32)


def sklearn_onnx(seed: int = 7, n_features: int = N_FEATURES) -> tuple[Any, bytes]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    x, y = dataset(seed)
    x = x[:, :n_features]
    model = LogisticRegression().fit(x, y)
    onnx_model = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(model): {"zipmap": False}},
        target_opset=15,
    )
    return model, onnx_model.SerializeToString()


def xgboost_json(seed: int = 7) -> tuple[Any, bytes]:
    from xgboost import XGBClassifier

    x, y = dataset(seed)
    model = XGBClassifier(n_estimators=25, max_depth=3, learning_rate=0.3, n_jobs=1)
    model.fit(x, y)
    return model, bytes(model.get_booster().save_raw(raw_format="json"))


def lightgbm_text(seed: int = 7) -> tuple[Any, bytes]:
    from lightgbm import LGBMClassifier

    x, y = dataset(seed)
    model = LGBMClassifier(n_estimators=25, num_leaves=8, n_jobs=1, verbose=-1)
    model.fit(x, y)
    return model, model.booster_.model_to_string().encode()


def version_dir(root: Path, name: str, files: dict[str, bytes], **metadata: Any) -> Path:
    """Seed 000's layout: <root>/<name>/<version>/<artifact> + metadata.json."""
    directory = root / name / VERSION
    directory.mkdir(parents=True)
    for fname, blob in files.items():
        directory.joinpath(fname).write_bytes(blob)
    if metadata:
        importer.write_metadata(directory, **metadata)
    return directory


def stored_files(name: str) -> set[str]:
    return {p.name for p in Path(store.get(name, VERSION).path).iterdir()}


def stored_card(name: str) -> store.ModelCard:
    return store.card_of(store.get(name, VERSION))


def test_onnx_directory_imports_and_predicts_like_sklearn(model_store: str, tmp_path: Path) -> None:
    name = unique("imp_onnx")
    model, blob = sklearn_onnx()
    version_dir(
        tmp_path,
        name,
        {"model.onnx": blob},
        framework="sklearn",
        task="binary",
        feature_names=FEATURES,
        description="logistic regression",
    )

    assert [str(t) for t in importer.import_directory(tmp_path)] == [f"{name}:{VERSION}"]

    card = stored_card(name)
    assert card.source == "imported"
    assert card.framework == "sklearn"
    assert card.feature_names == FEATURES
    assert card.checksums == {"model.onnx": store.sha256_bytes(blob)}
    x = probe_rows()
    got = ModelPool(name, VERSION).predict(x)
    assert got.shape == (len(x),)
    np.testing.assert_allclose(got, model.predict_proba(x)[:, 1], atol=1e-4)


def test_cli_imports_directory_then_reports_nothing_new(
    model_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("imp_cli")
    model, blob = sklearn_onnx(seed=11)
    version_dir(tmp_path, name, {"model.onnx": blob}, task="binary", feature_names=FEATURES)

    assert importer.main([str(tmp_path)]) == 0
    assert f"imported {name}:{VERSION}" in capsys.readouterr().out
    assert store.exists(name, VERSION)
    assert stored_card(name).framework == "onnx"  # inferred from the artifact
    x = probe_rows()
    np.testing.assert_allclose(
        ModelPool(name, VERSION).predict(x), model.predict_proba(x)[:, 1], atol=1e-4
    )

    assert importer.main([str(tmp_path)]) == 0
    assert "nothing new to import" in capsys.readouterr().out


def test_xgboost_json_file_imports_and_gains_matching_onnx(
    model_store: str, tmp_path: Path
) -> None:
    name = unique("imp_xgb")
    model, blob = xgboost_json()
    path = tmp_path / "booster.json"
    path.write_bytes(blob)

    code = importer.main(
        [
            "--file",
            str(path),
            "--name",
            name,
            "--version",
            VERSION,
            "--features",
            ",".join(FEATURES),
        ]
    )

    assert code == 0
    assert stored_files(name) >= {"model.json", "model.onnx"}
    card = stored_card(name)
    assert card.framework == "xgboost"
    assert card.task == "binary"
    assert set(card.checksums) == {"model.json", "model.onnx"}
    assert card.checksums["model.json"] == store.sha256_bytes(blob)
    loaded = ModelPool(name, VERSION).load(VERSION)
    assert loaded.explainer is not None  # the native booster is kept for explanations
    x = probe_rows()
    expected = model.predict_proba(x)[:, 1]
    np.testing.assert_allclose(ModelPool(name, VERSION).predict(x), expected, atol=1e-4)
    assert loaded.explainer.contributions(x).shape == (len(x), N_FEATURES)


def test_lightgbm_text_directory_imports_and_gains_matching_onnx(
    model_store: str, tmp_path: Path
) -> None:
    name = unique("imp_lgb")
    model, blob = lightgbm_text()
    version_dir(tmp_path, name, {"model.txt": blob}, task="binary", feature_names=FEATURES)

    assert [str(t) for t in importer.import_directory(tmp_path)] == [f"{name}:{VERSION}"]

    assert stored_files(name) >= {"model.txt", "model.onnx"}
    card = stored_card(name)
    assert card.framework == "lightgbm"
    assert card.checksums["model.txt"] == store.sha256_bytes(blob)
    assert "model.onnx" in card.checksums
    x = probe_rows()
    expected = np.asarray(model.predict_proba(x))[:, 1]
    np.testing.assert_allclose(ModelPool(name, VERSION).predict(x), expected, atol=1e-4)


def test_pickle_in_version_dir_is_rejected_and_nothing_saved(
    model_store: str, tmp_path: Path
) -> None:
    name = unique("imp_pkl")
    _, blob = sklearn_onnx()
    version_dir(
        tmp_path,
        name,
        {"model.onnx": blob, "model.pkl": b"\x80\x05N."},
        task="binary",
        feature_names=FEATURES,
    )

    with pytest.raises(ModelLoadError, match="pickle") as raised:
        importer.import_directory(tmp_path)

    assert "model.pkl" in str(raised.value)
    assert not store.exists(name, VERSION)
    assert importer.main([str(tmp_path)]) == 2
    assert not store.exists(name, VERSION)


def test_cli_rejects_a_pickle_file(model_store: str, tmp_path: Path) -> None:
    name = unique("imp_pklfile")
    path = tmp_path / "model.pkl"
    path.write_bytes(b"\x80\x05N.")

    code = importer.main(
        ["--file", str(path), "--name", name, "--version", VERSION, "--features", "a,b"]
    )

    assert code == 2
    assert not store.exists(name, VERSION)


@pytest.mark.parametrize("framework", ["onnx", "xgboost", "lightgbm"])
def test_wrong_feature_count_is_rejected_and_nothing_saved(
    model_store: str, framework: str
) -> None:
    name = unique(f"imp_nfeat_{framework}")
    artifacts = {
        "onnx": lambda: {"model.onnx": sklearn_onnx()[1]},
        "xgboost": lambda: {"model.json": xgboost_json()[1]},
        "lightgbm": lambda: {"model.txt": lightgbm_text()[1]},
    }[framework]()
    metadata = {"task": "binary", "feature_names": [*FEATURES, "extra"]}

    with pytest.raises(ModelLoadError, match=f"expects {N_FEATURES} features") as raised:
        importer.import_version(name, VERSION, artifacts, metadata)

    assert f"names {N_FEATURES + 1}" in str(raised.value)
    assert not store.exists(name, VERSION)


def test_corrupt_onnx_is_rejected_and_nothing_saved(model_store: str, tmp_path: Path) -> None:
    name = unique("imp_corrupt")
    junk = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    version_dir(tmp_path, name, {"model.onnx": junk}, task="binary", feature_names=FEATURES)

    with pytest.raises(ModelLoadError, match=r"model\.onnx cannot be loaded"):
        importer.import_directory(tmp_path)

    assert not store.exists(name, VERSION)
    assert importer.main([str(tmp_path)]) == 2
    assert not store.exists(name, VERSION)


def test_corrupt_native_booster_is_rejected_and_nothing_saved(model_store: str) -> None:
    name = unique("imp_badjson")

    with pytest.raises(ModelLoadError, match="not a loadable XGBoost model"):
        importer.import_version(
            name,
            VERSION,
            {"model.json": b'{"learner": "truncated'},
            {"task": "binary", "feature_names": FEATURES},
        )

    assert not store.exists(name, VERSION)


def test_existing_version_is_rejected_and_left_untouched(
    model_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique("imp_dup")
    model, blob = sklearn_onnx(seed=1)
    metadata = {"task": "binary", "feature_names": FEATURES}
    importer.import_version(name, VERSION, {"model.onnx": blob}, metadata)
    before = stored_card(name)
    stored_blob = Path(store.get(name, VERSION).path, "model.onnx").read_bytes()
    _, other = sklearn_onnx(seed=2)
    assert other != blob

    with pytest.raises(ModelLoadError, match="already in the model store"):
        importer.import_version(name, VERSION, {"model.onnx": other}, metadata)

    other_file = tmp_path / "other.onnx"
    other_file.write_bytes(other)
    cli = ["--file", str(other_file), "--name", name, "--version", VERSION]
    assert importer.main([*cli, "--features", ",".join(FEATURES)]) == 2
    assert "already in the model store" in capsys.readouterr().err
    version_dir(tmp_path / "layout", name, {"model.onnx": other}, **metadata)
    assert importer.import_directory(tmp_path / "layout") == []  # skipped, not replaced

    after = stored_card(name)
    assert after.checksums == before.checksums == {"model.onnx": store.sha256_bytes(blob)}
    assert after.created_at == before.created_at
    assert Path(store.get(name, VERSION).path, "model.onnx").read_bytes() == stored_blob
    x = probe_rows()
    np.testing.assert_allclose(
        ModelPool(name, VERSION).predict(x), model.predict_proba(x)[:, 1], atol=1e-4
    )


def test_force_replaces_an_existing_version(model_store: str) -> None:
    name = unique("imp_force")
    metadata = {"task": "binary", "feature_names": FEATURES}
    _, first = sklearn_onnx(seed=1)
    second_model, second = sklearn_onnx(seed=2)
    importer.import_version(name, VERSION, {"model.onnx": first}, metadata)

    importer.import_version(name, VERSION, {"model.onnx": second}, metadata, force=True)

    assert stored_card(name).checksums == {"model.onnx": store.sha256_bytes(second)}
    x = probe_rows()
    np.testing.assert_allclose(
        ModelPool(name, VERSION).predict(x), second_model.predict_proba(x)[:, 1], atol=1e-4
    )


def test_checksum_mismatch_in_store_fails_the_load(model_store: str) -> None:
    name = unique("imp_tamper")
    _, blob = sklearn_onnx(seed=1)
    importer.import_version(
        name, VERSION, {"model.onnx": blob}, {"task": "binary", "feature_names": FEATURES}
    )
    # a perfectly loadable model of the right shape, just not the one that was imported
    _, substitute = sklearn_onnx(seed=5)
    Path(store.get(name, VERSION).path, "model.onnx").write_bytes(substitute)
    pool = ModelPool(name, VERSION)

    with pytest.raises(ModelLoadError, match="checksum"):
        pool.load(VERSION)

    assert pool.versions == []
    assert "model.onnx" in pool.failed[VERSION]


def test_metadata_without_feature_names_is_rejected(model_store: str, tmp_path: Path) -> None:
    name = unique("imp_nofeat")
    _, blob = sklearn_onnx()
    version_dir(tmp_path, name, {"model.onnx": blob}, task="binary")

    with pytest.raises(ModelLoadError, match="feature_names"):
        importer.import_directory(tmp_path)

    assert not store.exists(name, VERSION)


def test_metadata_with_unknown_task_is_rejected(model_store: str, tmp_path: Path) -> None:
    name = unique("imp_task")
    _, blob = sklearn_onnx()
    version_dir(tmp_path, name, {"model.onnx": blob}, task="ranking", feature_names=FEATURES)

    with pytest.raises(ModelLoadError, match="task"):
        importer.import_directory(tmp_path)

    assert not store.exists(name, VERSION)


def test_version_dir_without_metadata_or_artifact_is_rejected(
    model_store: str, tmp_path: Path
) -> None:
    no_meta = unique("imp_nometa")
    version_dir(tmp_path / "a", no_meta, {"model.onnx": sklearn_onnx()[1]})
    with pytest.raises(ModelLoadError, match=r"no metadata\.json"):
        importer.import_directory(tmp_path / "a")
    assert not store.exists(no_meta, VERSION)

    bad_json = unique("imp_badmeta")
    directory = version_dir(tmp_path / "b", bad_json, {"model.onnx": sklearn_onnx()[1]})
    directory.joinpath("metadata.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        importer.import_directory(tmp_path / "b")
    assert not store.exists(bad_json, VERSION)

    no_artifact = unique("imp_noart")
    directory = version_dir(tmp_path / "c", no_artifact, {"weights.bin": b"\0" * 16})
    directory.joinpath("metadata.json").write_text(
        json.dumps({"task": "binary", "feature_names": FEATURES})
    )
    with pytest.raises(ModelLoadError, match=r"has none of model\.onnx"):
        importer.import_directory(tmp_path / "c")
    assert not store.exists(no_artifact, VERSION)


def test_missing_directory_is_an_error_not_an_empty_import(
    model_store: str, tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        importer.import_directory(tmp_path / "typo")
    assert importer.main([str(tmp_path / "typo")]) == 2


def test_invalid_name_and_non_object_metadata_are_rejected(model_store: str) -> None:
    _, blob = sklearn_onnx()
    with pytest.raises(ModelLoadError, match="not a valid model name"):
        importer.import_version("My Model!", "1", {"model.onnx": blob}, {"task": "binary"})
    with pytest.raises(ModelLoadError, match="JSON object"):
        importer.import_version(unique("listmeta"), "1", {"model.onnx": blob}, [1, 2])  # type: ignore[arg-type]


def test_partial_directory_import_says_what_was_saved(model_store: str, tmp_path: Path) -> None:
    _, blob = sklearn_onnx()
    good, bad = "a" + unique("good"), "z" + unique("bad")
    features = [f"f{i}" for i in range(N_FEATURES)]
    version_dir(tmp_path, good, {"model.onnx": blob}, feature_names=features, task="binary")
    version_dir(tmp_path, bad, {"model.onnx": b"garbage"}, feature_names=features, task="binary")
    with pytest.raises(ModelLoadError, match=f"imported before it: {good}:{VERSION}"):
        importer.import_directory(tmp_path)
    assert store.exists(good, VERSION) and not store.exists(bad, VERSION)


def test_artifact_dropped_into_a_stored_version_is_ignored(
    model_store: str, tmp_path: Path
) -> None:
    _, blob = sklearn_onnx()
    name = unique("dropped")
    features = [f"f{i}" for i in range(N_FEATURES)]
    importer.import_version(
        name, "1", {"model.onnx": blob}, {"feature_names": features, "task": "binary"}
    )
    _, booster = lightgbm_text()
    Path(store.get(name, "1").path, "model.txt").write_bytes(booster)
    loaded = ModelPool(name, "1").load("1")
    assert loaded.explainer is None  # the unvouched model.txt was not loaded
