"""`tiffin.client` against a real `bentoml serve` (two workers, the embedded feature store, the
tiny LLM, real JWTs), against a real uvicorn server that answers 503/429 to exercise retries,
and in process (local mode) over the same app."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests import seed_bodies as seed
from tests.conftest import Served, free_port, serve, stop, wait_for
from tests.doc_snippets import doc_blocks
from tests.store_cleanup import forget
from tiffin import model_store
from tiffin.auth import mint
from tiffin.client import (
    AsyncTiffinClient,
    BadRequest,
    Forbidden,
    NotFound,
    ServerError,
    ServiceUnavailable,
    TiffinClient,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnprocessableEntity,
)
from tiffin.client import models as cm
from tiffin.featurize import CARD_FRAUD_FEATURES
from tiffin.schemas import CardFraudResponse

pytestmark = pytest.mark.e2e
SECRET = "client-test-secret-0123456789abcdef-0123"
VOLATILE = {"latency_ms", "feature_freshness_sec", "time_to_first_token_ms", "tokens_per_second"}


@pytest.fixture(scope="module")
def served(model_store: str) -> Iterator[Served]:
    """No REDIS_URL: the embedded feature store, as local mode uses, so answers compare."""
    state_dir = tempfile.mkdtemp(prefix="tiffin-client-traffic-")
    app = serve(
        {
            "JWT_SECRET_KEY": SECRET,
            "TIFFIN_TRAFFIC_STATE_DIR": state_dir,
            "TIFFIN_TRAFFIC_POLL_INTERVAL_S": "0.1",
        },
        "serve-client.log",
    )
    yield app
    stop(app)
    forget("card_fraud", "v1.1-client")


@pytest.fixture
def client(served: Served) -> Iterator[TiffinClient]:
    with TiffinClient(served.url) as c:
        yield c


def _strip(body: object) -> object:
    if isinstance(body, dict):
        return {k: _strip(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [_strip(v) for v in body]
    return body


def _raw(served: Served, path: str, body: object | None = None) -> object:
    if body is None:
        return httpx.get(f"{served.url}{path}", timeout=30).json()
    return httpx.post(f"{served.url}{path}", json=body, timeout=30).json()


def test_scoring_methods_answer_what_the_service_answers(client, served: Served) -> None:
    pairs = [
        (client.score_fraud(**seed.CARD_FRAUD), "/score/fraud", seed.CARD_FRAUD),
        (client.score_personalization(**seed.PERSONALIZATION), "/score/personalization",
         seed.PERSONALIZATION),
        (client.score_batch(**seed.BATCH), "/score/batch", seed.BATCH),
        (client.predict_fraud(**seed.AD_FRAUD), "/predict/fraud", seed.AD_FRAUD),
        (client.predict_ctr(**seed.CTR), "/predict/ctr", seed.CTR),
        (client.predict_bid(**seed.BID), "/predict/bid", seed.BID),
        (client.v1_predict(**seed.V1_PREDICT), "/v1/models/predict", seed.V1_PREDICT),
    ]  # fmt: skip
    for answer, path, body in pairs:
        raw = _raw(served, path, body)
        assert _strip(answer.model_dump(mode="json", exclude_unset=True)) == _strip(raw), path
    assert isinstance(pairs[0][0], CardFraudResponse)
    generic = client.predict(**seed.GENERIC)
    assert generic.correlation_id == "test-123" and len(generic.prediction) == 3
    batch = client.predict_batch([seed.GENERIC, seed.GENERIC], batch_size=10)
    assert [b.prediction for b in batch] == [generic.prediction] * 2


def test_operational_methods(client, served: Served) -> None:
    health = client.health()
    assert isinstance(health, cm.Health) and health.models_loaded >= 7
    assert health.components["feature_store"]["backend"] == "embedded"
    assert client.ready().status == "ready"
    listing = client.models()
    card = next(f for f in listing.models if f.name == "card_fraud")
    assert card.versions[0].feature_names == list(CARD_FRAUD_FEATURES)
    assert client.model("card_fraud").name == "card_fraud"
    species = next(m for m in client.v1_models().models if m.name == "species_classifier")
    assert set(species.versions) == {"v1", "v2", "v2-quantized"}
    assert "ml_inference_requests_total" in client.metrics()
    assert client.circuit_breaker_status().state == "closed"
    assert client.llm_status().status in ("ok", "degraded")


def test_llm_methods(client) -> None:
    text = client.generate("The transaction", max_tokens=8, temperature=0, seed=1)
    assert isinstance(text, cm.GenerateResponse) and text.usage.completion_tokens >= 1
    structured = client.generate_structured("Great product", response_model="sentiment", seed=1)
    assert structured.valid and structured.data["label"] in ("positive", "neutral", "negative")
    pieces = list(client.generate_stream("The merchant", max_tokens=12, temperature=0, seed=1))
    assert len(pieces) >= 1 and "".join(pieces)
    with pytest.raises(UnprocessableEntity, match="max_tokens"):
        list(client.generate_stream("x", max_tokens=0))


def test_async_generate_stream(served: Served) -> None:
    async def run() -> list[str]:
        async with AsyncTiffinClient(served.url) as aclient:
            return [p async for p in aclient.generate_stream("The card", max_tokens=8, seed=3)]

    assert "".join(asyncio.run(run()))


@pytest.mark.parametrize(
    ("call", "error", "names"),
    [
        (lambda c: c.score_fraud("c", -1), BadRequest, "transaction_amount"),
        (lambda c: c.score_fraud("c", 5, mcc_code="54"), BadRequest, "mcc_code"),
        (lambda c: c.predict("nope", {"a": [1.0]}), NotFound, "nope"),
        (lambda c: c.predict("your_model", {"feature1": [1.0]}), UnprocessableEntity, "feature2"),
        (lambda c: c.v1_predict([[1, 2, 3, 4]], version="v9"), NotFound, "v9"),
        (lambda c: c.model("weather"), NotFound, "weather"),
        (lambda c: c.set_traffic_split({"v1": 100}), Unauthorized, "bearer"),
        (lambda c: c.generate_structured("x", response_model="nope"), UnprocessableEntity, "nope"),
    ],
)
def test_errors_are_typed_and_carry_the_services_message(client, call, error, names) -> None:
    with pytest.raises(error) as caught:
        call(client)
    assert names in str(caught.value) and caught.value.status == error.status
    assert caught.value.request_id


def test_admin_calls_with_a_token(served: Served) -> None:
    with TiffinClient(served.url, token=mint(SECRET, "models:write", 600)) as writer:
        with pytest.raises(Forbidden, match="traffic:write"):
            writer.set_traffic_split({"v1": 100})
        artifact = Path(model_store.get("card_fraud", "v1.0").path, "model.json").read_bytes()
        registered = writer.register_model(
            "card_fraud",
            "v1.1-client",
            artifact=artifact,
            filename="model.json",
            feature_names=CARD_FRAUD_FEATURES,
            task="binary",
        )
        assert registered.model_id == "card_fraud:v1.1-client" and registered.status == "registered"
        with pytest.raises(UnprocessableEntity, match="v9-missing"):
            writer.activate("card_fraud", "v9-missing")
    with TiffinClient(served.url, token=mint(SECRET, "admin", 600)) as admin:
        split = admin.set_traffic_split({"v1.0": 80, "v1.1-client": 20}, model="card_fraud")
        assert split == {"v1.0": 80, "v1.1-client": 20} == admin.traffic_split(model="card_fraud")
        assert admin.set_shadows(["v1.1-client"], model="card_fraud").shadows == ["v1.1-client"]
        assert admin.set_shadows([], model="card_fraud").shadows == []
        metrics = admin.version_metrics("v1.1-client", model="card_fraud")
        assert metrics.weight == 20 and metrics.model == "card_fraud"
        activated = admin.activate("card_fraud", "v1.0")
        assert activated.deployment.status == "completed"
        assert admin.traffic_split(model="card_fraud") == {"v1.0": 100}
        deployed = admin.deploy("card_fraud", "v1.1-client", strategy="blue-green")
        assert deployed.status == "completed" and deployed.stable_version == "v1.0"
        assert admin.deployment(deployed.id).target_version == "v1.1-client"
        assert admin.deployments()[0].id == deployed.id
        assert any(e.event == "deploy_completed" for e in admin.events())
        assert admin.reload("card_fraud").message == "Reloading model card_fraud"
        test = admin.start_ab_test("client-ab", "card_fraud:v1.0", "card_fraud:v1.1-client", 0.5)
        assert test.status == "running"
        assert any(t.test_id == "client-ab" for t in admin.ab_tests())
        assert admin.stop_ab_test("client-ab").status == "stopped"
        admin.activate("card_fraud", "v1.0")


def test_async_client_gives_the_same_answers(served: Served, client) -> None:
    card: dict[str, Any] = seed.CARD_FRAUD

    async def run() -> tuple[Any, Any, Any]:
        async with AsyncTiffinClient(served.url) as aclient:
            fraud, models = await asyncio.gather(aclient.score_fraud(**card), aclient.v1_models())
            with pytest.raises(NotFound, match="nope"):
                await aclient.predict("nope", {"a": [1.0]})
            return fraud, models, await aclient.health()

    fraud, models, health = asyncio.run(run())
    assert _strip(fraud.model_dump()) == _strip(client.score_fraud(**card).model_dump())
    assert models == client.v1_models()
    assert isinstance(health, cm.Health)


# --- retries, against a real server that refuses on purpose -----------------------------------


HEALTHY = {"status": "ok", "models_loaded": 1, "uptime_seconds": 1.0}


class Flaky:
    """A real HTTP server whose routes fail a set number of times before answering."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        self.request_ids: list[str] = []

        def failing(status: int, times: int, retry_after: str | None, answer: object = None):
            async def endpoint(request: Request) -> JSONResponse:
                hits = self.seen.setdefault(request.url.path, [])
                hits.append(time.monotonic())
                self.request_ids.append(request.headers.get("x-request-id", ""))
                if len(hits) <= times:
                    headers = {"Retry-After": retry_after} if retry_after else {}
                    return JSONResponse({"error": f"busy {len(hits)}"}, status, headers)
                return JSONResponse(answer or {"status": "ready", "models": ["m"]})

            return endpoint

        self.app = Starlette(
            routes=[
                Route("/ready", failing(503, 0, None)),
                Route("/health", failing(503, 2, "1", HEALTHY)),
                Route("/models", failing(429, 1, None, {"models": []})),
                Route("/llm/status", failing(503, 99, "3600")),
                Route("/v1/models", failing(500, 99, None)),
                Route("/score/fraud", failing(503, 99, None), methods=["POST"]),
            ]
        )
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )

    def __enter__(self) -> Flaky:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def flaky() -> Iterator[Flaky]:
    with Flaky() as server:
        yield server


def test_retry_after_is_honoured_and_the_request_id_is_kept(flaky: Flaky) -> None:
    with TiffinClient(f"http://127.0.0.1:{flaky.port}", retries=3) as c:
        started = time.monotonic()
        assert c.health().models_loaded == 1
    hits = flaky.seen["/health"]
    assert len(hits) == 3  # two 503s, then the answer
    assert hits[1] - hits[0] >= 0.95 and hits[2] - hits[1] >= 0.95  # Retry-After: 1, twice
    assert time.monotonic() - started < 10
    assert len(set(flaky.request_ids)) == 1  # one logical request, one id across retries


def test_429_is_retried_with_backoff_and_5xx_other_than_503_is_not(flaky: Flaky) -> None:
    with TiffinClient(f"http://127.0.0.1:{flaky.port}", retries=2) as c:
        assert c.ready().status == "ready"
        assert c.models().models == []
        assert len(flaky.seen["/models"]) == 2  # one 429, then the answer
        with pytest.raises(ServerError) as caught:
            c.v1_models()
        assert caught.value.status == 500 and len(flaky.seen["/v1/models"]) == 1


def test_a_long_retry_after_is_not_waited_for_and_retries_are_bounded(flaky: Flaky) -> None:
    with TiffinClient(f"http://127.0.0.1:{flaky.port}", retries=2) as c:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="busy 1"):
            c.llm_status()  # Retry-After: 3600 is beyond max_retry_after_s: raised at once
        assert time.monotonic() - started < 1 and len(flaky.seen["/llm/status"]) == 1
        with pytest.raises(ServiceUnavailable, match="busy 3") as caught:
            c.score_fraud("c", 1.0)
        assert caught.value.status == 503 and len(flaky.seen["/score/fraud"]) == 3


def test_unreachable_service_is_a_transport_error_after_retries() -> None:
    started = time.monotonic()
    with (
        TiffinClient(f"http://127.0.0.1:{free_port()}", retries=2) as c,
        pytest.raises(TransportError, match="failed"),
    ):
        c.score_fraud("c", 1.0)  # connection refused: never sent, so even a POST is retried
    assert time.monotonic() - started < 5


def test_too_many_requests_surfaces_after_the_last_retry(flaky: Flaky) -> None:
    client = TiffinClient(f"http://127.0.0.1:{flaky.port}", retries=0)
    with client, pytest.raises(TooManyRequests, match="busy 1"):
        client.models()


# --- mode selection and local mode ------------------------------------------------------------


def test_seed_003_variables_choose_the_mode(monkeypatch, served: Served) -> None:
    monkeypatch.setenv("REMOTE_INFERENCE_ENABLED", "true")
    monkeypatch.setenv("REMOTE_INFERENCE_URL", served.url)
    monkeypatch.setenv("REMOTE_INFERENCE_TIMEOUT", "7")
    with TiffinClient() as c:
        assert not c.local and c.settings.timeout_s == 7
        assert c.health().status in ("ok", "degraded")
    monkeypatch.setenv("REMOTE_INFERENCE_ENABLED", "false")
    assert TiffinClient(served.url).local is False  # an explicit URL is remote


def test_sync_local_mode_runs_an_asgi_app_in_process(served: Served) -> None:
    """The in-process machinery (private loop thread, ASGI transport) over a real Tiffin app:
    the operational routes, which list the same model store the server reads."""
    from tiffin.app import local_app

    with TiffinClient(app=local_app()) as local, TiffinClient(served.url) as remote:
        assert local.local
        names = [f.name for f in local.models().models]
        assert names == [f.name for f in remote.models().models]
        for _ in range(3):  # the same loop serves every call
            versions = {v.version for v in local.model("card_fraud").versions}
            assert versions == {v.version for v in remote.model("card_fraud").versions}
        with pytest.raises(NotFound, match="weather"):
            local.model("weather")


def _local_app_available() -> bool:
    try:
        return hasattr(importlib.import_module("tiffin.app"), "local_app")
    except ImportError:
        return False


@pytest.mark.skipif(not _local_app_available(), reason="needs tiffin.app.local_app (issue 9)")
def test_local_mode_answers_what_the_service_answers(monkeypatch, served: Served) -> None:
    monkeypatch.delenv("REMOTE_INFERENCE_ENABLED", raising=False)
    with TiffinClient() as local, TiffinClient(served.url) as remote:
        assert local.local
        pairs: list[tuple[str, dict[str, Any]]] = [
            ("score_fraud", seed.CARD_FRAUD),
            ("score_personalization", seed.PERSONALIZATION),
            ("predict_fraud", seed.AD_FRAUD),
            ("predict", seed.GENERIC),
            ("v1_predict", seed.V1_PREDICT),
        ]
        for method, body in pairs:
            here = getattr(local, method)(**body).model_dump()
            there = getattr(remote, method)(**body).model_dump()
            assert _strip(here) == _strip(there), method
        with pytest.raises(BadRequest, match="transaction_amount"):
            local.score_fraud("c", -1)


# --- README.md's client section, executed as written ---------------------------------------


def test_docs_snippets_run_as_written(served: Served, tmp_path: Path) -> None:
    """Every python and bash block, in order, in one shell: the only change is the service's
    address for `localhost:3000`. Tagged blocks run when what they need exists."""
    from tests.test_cli import console_script

    available = {"local": _local_app_available()}
    available["oip"] = httpx.get(f"{served.url}/v2", timeout=10).status_code == 200
    address = served.url.removeprefix("http://")
    script, skipped = ["set -euo pipefail"], []
    for language, tags, code in doc_blocks():
        if language not in ("python", "bash"):
            continue
        missing = [t for t in tags if not available.get(t, False)]
        if missing:
            skipped.append(missing)
            continue
        code = code.replace("localhost:3000", address)
        if language == "python":
            script.append(f"\"$TIFFIN_PYTHON\" - <<'TIFFIN_DOC_EOF'\n{code}\nTIFFIN_DOC_EOF")
        else:
            script.append(code)
    assert len(script) >= 7, "README.md (client section) lost its examples"
    bin_dir = Path(console_script(tmp_path)[0]).parent
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("REMOTE_INFERENCE")},
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "TIFFIN_PYTHON": sys.executable,
        "JWT_SECRET_KEY": SECRET,
        "TIFFIN_TOKEN": mint(SECRET, "admin", 600),
        "COLUMNS": "200",
    }
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "400 transaction_amount: Input should be greater than 0" in out
    assert "404 model_name:" in out and "no_such_model" in out
    assert "{'v1': 90, 'v2': 10}" in out and "{'v1': 100}" in out
    assert "species_classifier" in out and "rolled back to v1" in out
    assert '"v1": 100' in out  # the last `tiffin split --json`
    if skipped:
        print(f"skipped doc blocks needing {skipped} (needs tiffin.app.local_app / V2 routes)")
