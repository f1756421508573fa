"""Model lifecycle end to end: a real `bentoml serve` (two workers) over a real Redis, driven
through the admin API with real JWTs: splits, stickiness, hot swap under load, canary rollback of
a deliberately broken model, A/B tests, shadows, and traffic state surviving a restart."""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.artifacts import broken_onnx
from tests.conftest import RedisServer, Served, serve, stop
from tiffin import model_store
from tiffin.auth import mint
from tiffin.featurize import CARD_FRAUD_FEATURES

pytestmark = pytest.mark.e2e
SECRET = "lifecycle-test-secret-0123456789abcdef"
ENV = {"JWT_SECRET_KEY": SECRET, "TIFFIN_TRAFFIC_POLL_INTERVAL_S": "0.1"}


def token(scope: str = "admin", ttl: int = 600) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(SECRET, scope, ttl)}"}


@pytest.fixture(scope="module")
def redis(model_store: str) -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app(redis: RedisServer) -> Iterator[Served]:
    served = serve({**ENV, "REDIS_URL": redis.url}, "serve-lifecycle.log")
    yield served
    stop(served)


def post(
    app: Served, path: str, body: object, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(f"{app.url}{path}", json=body, headers=headers, timeout=120)


def card_fraud_artifact(filename: str = "model.json") -> str:
    stored = model_store.get("card_fraud", "v1.0")
    return base64.b64encode(Path(stored.path, filename).read_bytes()).decode()


def register(
    app: Served, version: str, artifact: str, filename: str = "model.json"
) -> httpx.Response:
    return post(
        app,
        "/models/register",
        {
            "name": "card_fraud",
            "version": version,
            "artifact_base64": artifact,
            "filename": filename,
            "feature_names": list(CARD_FRAUD_FEATURES),
            "task": "binary",
            "description": "test version",
        },
        token("models:write"),
    )


def score(app: Served, card: str) -> httpx.Response:
    return post(app, "/score/fraud", {"card_id": card, "transaction_amount": 42.0})


def test_admin_writes_need_a_valid_token_with_the_right_scope(app: Served) -> None:
    body = {"v1": 90, "v2": 10}
    assert post(app, "/v1/traffic-split", body).status_code == 401
    assert (
        post(app, "/v1/traffic-split", body, {"Authorization": "Bearer nonsense"}).status_code
        == 401
    )
    expired = {"Authorization": f"Bearer {mint(SECRET, 'admin', -60)}"}
    response = post(app, "/v1/traffic-split", body, expired)
    assert response.status_code == 401 and "expired" in response.json()["error"]
    forged = {"Authorization": f"Bearer {mint('another-secret-another-secret-1234', 'admin', 60)}"}
    assert post(app, "/v1/traffic-split", body, forged).status_code == 401
    wrong_scope = post(app, "/v1/traffic-split", body, token("models:write"))
    assert wrong_scope.status_code == 403 and "traffic:write" in wrong_scope.json()["error"]
    assert httpx.get(f"{app.url}/v1/traffic-split").json() == {"v1": 100}


def test_register_rejects_bad_artifacts_and_changes_nothing(app: Served) -> None:
    corrupt = base64.b64encode(b"not a model").decode()
    response = register(app, "v8-corrupt", corrupt, "model.onnx")
    assert response.status_code == 422 and "model.onnx" in response.json()["error"]
    assert not model_store.exists("card_fraud", "v8-corrupt")
    wrong_width = post(
        app,
        "/models/register",
        {
            "name": "card_fraud",
            "version": "v8-narrow",
            "artifact_base64": card_fraud_artifact(),
            "filename": "model.json",
            "feature_names": ["a", "b"],
            "task": "binary",
        },
        token(),
    )
    assert wrong_width.status_code == 422 and "features" in wrong_width.json()["error"]
    checksum = post(
        app,
        "/models/register",
        {
            "name": "card_fraud",
            "version": "v8-sum",
            "artifact_base64": card_fraud_artifact(),
            "filename": "model.json",
            "feature_names": list(CARD_FRAUD_FEATURES),
            "task": "binary",
            "sha256": "0" * 64,
        },
        token(),
    )
    assert checksum.status_code == 422 and "sha256" in checksum.json()["error"]
    bad_tag = register(app, "v 8!", card_fraud_artifact())  # BentoML's tag rules refuse it
    assert bad_tag.status_code == 422 and "version" in bad_tag.json()["error"], bad_tag.text
    assert post(app, "/models/card fraud:v1/activate", {}, token()).status_code == 404
    assert httpx.get(f"{app.url}/v1/traffic-split?model=bad%20name!").status_code == 404
    assert score(app, "card_00000001").json()["model_version"] == "v1.0"


def test_register_second_version(app: Served) -> None:
    response = register(app, "v2.0", card_fraud_artifact())
    assert response.status_code == 201, response.text
    assert response.json()["model_id"] == "card_fraud:v2.0"
    duplicate = register(app, "v2.0", card_fraud_artifact())
    assert duplicate.status_code == 422 and "already" in duplicate.json()["error"]


def test_invalid_weights_are_422_and_unknown_model_404(app: Served) -> None:
    for weights, fragment in [
        ({"v1.0": 110, "v2.0": -10}, "negative"),
        ({"v1.0": 50, "v2.0": 40}, "sum to 100"),
        ({"v1.0": 50, "v7": 50}, "v7"),
    ]:
        r = post(app, "/v1/traffic-split?model=card_fraud", weights, token())
        assert r.status_code == 422 and fragment in r.json()["error"], r.text
    assert post(app, "/v1/traffic-split?model=nope", {"v1": 100}, token()).status_code == 404
    assert post(app, "/models/nope:v1/activate", {}, token()).status_code == 404
    assert httpx.get(f"{app.url}/v1/traffic-split?model=card_fraud").json() == {"v1.0": 100}


def test_split_lands_within_two_points_and_is_sticky(app: Served) -> None:
    r = post(app, "/v1/traffic-split?model=card_fraud", {"v1.0": 90, "v2.0": 10}, token())
    assert r.status_code == 200 and r.json() == {"v1.0": 90, "v2.0": 10}
    seen: dict[str, str] = {}
    with httpx.Client(base_url=app.url, timeout=30) as client:
        for i in range(2000):
            card = f"card_{i:08d}"
            seen[card] = client.post(
                "/score/fraud", json={"card_id": card, "transaction_amount": 10.0}
            ).json()["model_version"]
        share = Counter(seen.values())["v2.0"] / len(seen)
        assert abs(share - 0.10) <= 0.02, share
        for card in list(seen)[:50]:
            for _ in range(3):
                again = client.post(
                    "/score/fraud", json={"card_id": card, "transaction_amount": 99.0}
                )
                assert again.json()["model_version"] == seen[card]
    assert httpx.get(f"{app.url}/v1/metrics/v2.0?model=card_fraud").json()["requests"] > 100


def test_activation_under_load_loses_nothing_and_completes_everywhere(app: Served) -> None:
    failures: list[str] = []
    versions_after: list[str] = []
    switched = threading.Event()
    stop_at = time.monotonic() + 60

    def hammer(worker: int) -> None:
        with httpx.Client(base_url=app.url, timeout=30) as client:
            i = 0
            while time.monotonic() < stop_at and not (
                switched.is_set() and len(versions_after) > 400
            ):
                response = client.post(
                    "/score/fraud",
                    json={
                        "card_id": f"card_{(worker * 7919 + i) % 5000:08d}",
                        "transaction_amount": 25.0,
                    },
                )
                i += 1
                if response.status_code != 200:
                    failures.append(response.text)
                elif switched.is_set():
                    versions_after.append(response.json()["model_version"])

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(2)
    activated = post(app, "/models/card_fraud:v1.0/activate", {}, token("models:write"))
    switched.set()
    for t in threads:
        t.join()
    assert activated.status_code == 200, activated.text
    assert failures == []
    assert versions_after and set(versions_after) == {"v1.0"}


def test_canary_of_a_broken_model_rolls_back_and_requests_keep_succeeding(app: Served) -> None:
    assert register(app, "v9-broken", broken_onnx(), "model.onnx").status_code == 201
    deploy = post(
        app,
        "/models/card_fraud:v9-broken/deploy",
        {
            "strategy": "canary",
            "steps": [50, 100],
            "analysis_window_s": 60,
            "thresholds": {"min_samples": 10},
        },
        token(),
    )
    assert deploy.status_code == 202, deploy.text
    deployment_id = deploy.json()["id"]
    second = post(app, "/models/card_fraud:v2.0/deploy", {"strategy": "canary"}, token())
    assert second.status_code == 409
    failures, status = [], "in_progress"
    with httpx.Client(base_url=app.url, timeout=30) as client:
        deadline = time.monotonic() + 45
        i = 0
        while status == "in_progress" and time.monotonic() < deadline:
            for _ in range(20):
                r = client.post(
                    "/score/fraud", json={"card_id": f"card_{i:08d}", "transaction_amount": 30.0}
                )
                i += 1
                if r.status_code != 200 or r.json()["model_version"] == "v9-broken":
                    failures.append(r.text)
            status = client.get(f"/deployments/{deployment_id}").json()["status"]
        assert status == "rolled_back"
        assert failures == []  # the canary's failures were answered by the stable version
        detail = client.get(f"/deployments/{deployment_id}").json()
        assert "error rate" in detail["reason"]
        assert client.get("/v1/traffic-split?model=card_fraud").json() == {"v1.0": 100}
        after = [
            client.post(
                "/score/fraud", json={"card_id": f"card_{n:08d}", "transaction_amount": 30.0}
            )
            for n in range(200)
        ]
        assert all(r.status_code == 200 and r.json()["model_version"] == "v1.0" for r in after)
        errors = client.get("/v1/metrics/v9-broken?model=card_fraud").json()
        assert errors["errors"] >= 10
        events = [e["event"] for e in client.get("/events").json()["events"]]
        assert "deploy_rolled_back" in events


def test_ab_test_reports_arms_and_significance(app: Served) -> None:
    start = post(
        app,
        "/ab-tests/start",
        {
            "test_id": "cf-ab-1",
            "model_a": "card_fraud:v1.0",
            "model_b": "card_fraud:v2.0",
            "traffic_split": 0.5,
            "duration_hours": 1,
            "success_metrics": ["error_rate", "response_time", "accuracy"],
        },
        token("traffic:write"),
    )
    assert start.status_code == 201, start.text
    early = httpx.get(f"{app.url}/ab-tests").json()["tests"][0]["result"]
    assert early["conclusion"] == "insufficient_data"
    with httpx.Client(base_url=app.url, timeout=30) as client:
        for i in range(600):
            client.post(
                "/score/fraud", json={"card_id": f"card_{i:08d}", "transaction_amount": 50.0}
            )
    result = httpx.get(f"{app.url}/ab-tests").json()["tests"][0]["result"]
    assert result["arms"]["a"]["requests"] >= 100 and result["arms"]["b"]["requests"] >= 100
    assert result["conclusion"] in ("significant_difference", "no_significant_difference")
    assert 0 <= result["metrics"]["error_rate"]["p_value"] <= 1
    assert "unavailable" in result["metrics"]["accuracy"]
    stopped = post(app, "/ab-tests/cf-ab-1/stop", {}, token("traffic:write"))
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert httpx.get(f"{app.url}/v1/traffic-split?model=card_fraud").json() == {"v1.0": 100}


def test_shadow_version_sees_traffic_but_never_answers(app: Served) -> None:
    r = post(app, "/v1/shadows?model=card_fraud", {"versions": ["v2.0"]}, token())
    assert r.status_code == 200
    before = httpx.get(f"{app.url}/v1/metrics/v2.0?model=card_fraud").json()["requests"]
    answers = {score(app, f"card_{i:08d}").json()["model_version"] for i in range(100)}
    time.sleep(0.5)
    after = httpx.get(f"{app.url}/v1/metrics/v2.0?model=card_fraud").json()
    assert answers == {"v1.0"}
    assert after["requests"] - before >= 100 and after["shadow"] is True
    versions = httpx.get(f"{app.url}/models/card_fraud").json()["versions"]
    states = {v["version"]: v for v in versions}
    assert states["v2.0"]["shadow"] is True and states["v1.0"]["serving_weight"] == 100
    assert post(app, "/v1/shadows?model=card_fraud", {"versions": []}, token()).status_code == 200


def test_blue_green_and_rolling_deployments_complete(app: Served) -> None:
    green = post(app, "/models/card_fraud:v2.0/deploy", {"strategy": "blue-green"}, token())
    assert green.status_code == 200 and green.json()["status"] == "completed", green.text
    assert httpx.get(f"{app.url}/v1/traffic-split?model=card_fraud").json() == {"v2.0": 100}
    assert score(app, "card_00000003").json()["model_version"] == "v2.0"
    rolling = post(
        app,
        "/models/card_fraud:v1.0/deploy",
        {
            "strategy": "rolling",
            "steps": [50, 100],
            "analysis_window_s": 1,
            "thresholds": {"min_samples": 5},
        },
        token(),
    )
    assert rolling.status_code == 202, rolling.text
    status, seen = "in_progress", set()
    with httpx.Client(base_url=app.url, timeout=30) as client:
        deadline, i = time.monotonic() + 30, 0
        while status == "in_progress" and time.monotonic() < deadline:
            for _ in range(20):
                r = client.post(
                    "/score/fraud", json={"card_id": f"card_{i:08d}", "transaction_amount": 9.0}
                )
                assert r.status_code == 200
                seen.add(r.json()["model_version"])
                i += 1
            status = client.get(f"/deployments/{rolling.json()['id']}").json()["status"]
    assert status == "completed" and seen == {"v1.0", "v2.0"}
    assert httpx.get(f"{app.url}/v1/traffic-split?model=card_fraud").json() == {"v1.0": 100}
    bad = post(
        app, "/models/card_fraud:v2.0/deploy", {"strategy": "canary", "steps": [60, 30]}, token()
    )
    assert bad.status_code == 422 and "steps" in bad.json()["error"]


def test_reload_answers_in_seed_003_shape(app: Served) -> None:
    r = post(app, "/reload/card_fraud", {}, token("models:write"))
    assert r.status_code == 200 and r.json()["message"] == "Reloading model card_fraud"
    assert post(app, "/reload/nope", {}, token()).status_code == 404


def test_traffic_state_survives_a_restart(app: Served, redis: RedisServer) -> None:
    post(app, "/v1/traffic-split?model=card_fraud", {"v1.0": 70, "v2.0": 30}, token())
    stop(app)
    restarted = serve({**ENV, "REDIS_URL": redis.url}, "serve-lifecycle-2.log")
    try:
        assert httpx.get(f"{restarted.url}/v1/traffic-split?model=card_fraud").json() == {
            "v1.0": 70,
            "v2.0": 30,
        }
        versions = {score(restarted, f"card_{i:08d}").json()["model_version"] for i in range(200)}
        assert versions == {"v1.0", "v2.0"}
    finally:
        stop(restarted)
