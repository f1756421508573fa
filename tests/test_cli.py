"""The `tiffin` console script, run as a subprocess: train and import into a temporary BentoML
store, and status / list / register / split / deploy / rollback against a real `bentoml serve`
(two workers, real JWTs minted by the CLI from JWT_SECRET_KEY)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Served, serve, stop
from tests.store_cleanup import forget
from tiffin import model_store
from tiffin.featurize import BID_FEATURES, CARD_FRAUD_FEATURES

pytestmark = pytest.mark.e2e
SECRET = "cli-test-secret-0123456789abcdef-0123456"
Run = Callable[..., subprocess.CompletedProcess[str]]


def console_script(tmp: Path) -> list[str]:
    """The installed `tiffin` script (`pip install -e .` writes it from [project.scripts]); in
    a venv installed before the entry existed, the same wrapper pip writes, from the entry."""
    installed = Path(sys.executable).parent / "tiffin"
    if installed.exists():
        return [str(installed)]
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["tiffin"]
    module, function = entry.split(":")
    script = tmp / "tiffin"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
        f"if __name__ == '__main__':\n    sys.exit({function}())\n"
    )
    script.chmod(0o755)
    return [str(script)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    command = console_script(tmp_path_factory.mktemp("bin"))

    def invoke(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("REMOTE_INFERENCE")},
            "PYTHONPATH": str(REPO),
            "COLUMNS": "220",
            **env,
        }
        return subprocess.run(
            [*command, *args], env=full_env, capture_output=True, text=True, timeout=600
        )

    return invoke


# --- local model store ------------------------------------------------------------------------


def test_train_and_import_into_a_temporary_store(run: Run, tmp_path: Path) -> None:
    home = str(tmp_path / "bentoml")
    trained = run("train", "--only", "bid_optimization", "--rows", "2000", BENTOML_HOME=home)
    assert trained.returncode == 0, trained.stderr
    assert "bid_optimization" in trained.stdout and "trained" in trained.stdout
    assert "rmse=" in trained.stdout
    again = run("train", "--only", "bid_optimization", BENTOML_HOME=home)
    assert again.returncode == 0 and "kept" in again.stdout

    stored = next(Path(home, "models", "bid_optimization").glob("*/model.onnx"))
    layout = tmp_path / "layout" / "bids" / "2.0.0"
    layout.mkdir(parents=True)
    layout.joinpath("model.onnx").write_bytes(stored.read_bytes())
    names = list(BID_FEATURES)
    layout.joinpath("metadata.json").write_text(
        json.dumps({"feature_names": names, "task": "regression"})
    )
    imported = run("import", str(tmp_path / "layout"), BENTOML_HOME=home)
    assert imported.returncode == 0, imported.stderr
    assert "bids" in imported.stdout and "2.0.0" in imported.stdout

    one = run(
        "import", "--file", str(stored), "--name", "bids", "--version", "2.0.1",
        "--features", ",".join(names), "--task", "regression", "--json", BENTOML_HOME=home,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)[0]["feature_names"] == names

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    refused = run(
        "import", "--file", str(broken), "--name", "bids", "--version", "3.0.0",
        "--features", "a", BENTOML_HOME=home,
    )  # fmt: skip
    assert refused.returncode == 1 and "cannot be loaded" in refused.stderr
    assert not Path(home, "models", "bids", "3.0.0").exists()


# --- against a service ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model_store: str) -> Iterator[Served]:
    app = serve(
        {
            "JWT_SECRET_KEY": SECRET,
            "TIFFIN_TRAFFIC_STATE_DIR": tempfile.mkdtemp(prefix="tiffin-cli-traffic-"),
            "TIFFIN_TRAFFIC_POLL_INTERVAL_S": "0.1",
        },
        "serve-cli.log",
    )
    yield app
    stop(app)
    forget("card_fraud", "v1.2-cli")


@pytest.fixture(scope="module")
def admin(run: Run, served: Served) -> Run:
    """The CLI with the service's secret in its environment: it mints its own admin tokens."""

    def invoke(*args: str) -> subprocess.CompletedProcess[str]:
        return run(*args, "--url", served.url, JWT_SECRET_KEY=SECRET)

    return invoke


def test_status_and_list(admin: Run) -> None:
    status = admin("status")
    assert status.returncode == 0, status.stderr
    for shown in ("Serving", "card_fraud", "species_classifier", "feature_store"):
        assert shown in status.stdout, shown
    listing = admin("list", "--json")
    families = {f["name"]: f for f in json.loads(listing.stdout)["models"]}
    assert {v["version"] for v in families["species_classifier"]["versions"]} == {
        "v1",
        "v2",
        "v2-quantized",
    }
    table = admin("list")
    assert "v1.0 *" in table.stdout and "100%" in table.stdout


def test_writes_without_a_token_say_how_to_get_one(run: Run, served: Served) -> None:
    refused = run("split", "card_fraud", "v1.0=100", "--url", served.url, JWT_SECRET_KEY="")
    assert refused.returncode == 1
    assert "bearer" in refused.stderr and "TIFFIN_TOKEN" in refused.stderr


def _traffic(url: str, stop_event: threading.Event) -> None:
    """Scoring requests while a canary runs, so each step has samples; bounded."""
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(5000):
            if stop_event.is_set() or time.monotonic() > deadline:
                return
            client.post("/score/fraud", json={"card_id": f"card_{i:08d}", "transaction_amount": 50})


def test_register_split_canary_and_rollback(admin: Run, served: Served) -> None:
    artifact = Path(model_store.get("card_fraud", "v1.0").path, "model.json")
    registered = admin(
        "register", "card_fraud", "v1.2-cli", "--file", str(artifact),
        "--features", ",".join(CARD_FRAUD_FEATURES), "--task", "binary",
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    assert "card_fraud:v1.2-cli" in registered.stdout

    shown = admin("split", "card_fraud")
    assert shown.returncode == 0 and "v1.0" in shown.stdout and "100" in shown.stdout
    split = admin("split", "card_fraud", "v1.0=70", "v1.2-cli=30", "--json")
    assert json.loads(split.stdout) == {"v1.0": 70, "v1.2-cli": 30}
    bad = admin("split", "card_fraud", "v1.0=70", "v9=30")
    assert bad.returncode == 1 and "v9" in bad.stderr

    stop_event = threading.Event()
    load = threading.Thread(target=_traffic, args=(served.url, stop_event), daemon=True)
    load.start()
    try:
        deployed = admin(
            "deploy", "card_fraud", "v1.2-cli", "--strategy", "canary", "--steps", "50,100",
            "--window", "1", "--min-samples", "20", "--wait", "--wait-timeout", "90",
            # sticky routing sends different cards to each arm: their scores differ by design
            "--max-score-psi", "10",
        )  # fmt: skip
    finally:
        stop_event.set()
        load.join(15)
    assert deployed.returncode == 0, deployed.stderr
    assert "completed" in deployed.stdout and "step" in deployed.stdout
    assert json.loads(admin("split", "card_fraud", "--json").stdout) == {"v1.2-cli": 100}

    rolled = admin("rollback", "card_fraud")
    assert rolled.returncode == 0, rolled.stderr
    assert "rolled back to v1.0" in rolled.stdout
    assert json.loads(admin("split", "card_fraud", "--json").stdout) == {"v1.0": 100}
    nothing = admin("rollback", "species_classifier")
    assert nothing.returncode == 1 and "no deployment of species_classifier" in nothing.stderr
    pinned = admin("rollback", "species_classifier", "--to", "v2")
    assert pinned.returncode == 0 and "rolled back to v2" in pinned.stdout
    assert admin("rollback", "species_classifier", "--to", "v1").returncode == 0


def test_rollback_refuses_while_a_deployment_runs(admin: Run) -> None:
    """Last in the module: it leaves a canary running (no traffic reaches its analysis)."""
    started = admin(
        "deploy", "species_classifier", "v2", "--strategy", "canary", "--window", "3600", "--json"
    )
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["status"] == "in_progress"
    status = admin("status")
    assert "species_classifier v1 -> v2" in status.stdout
    refused = admin("rollback", "species_classifier")
    assert refused.returncode == 1 and "still in progress" in refused.stderr
