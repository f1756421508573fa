"""Three `bentoml serve` replicas on one host, sharing one seeded redis-server, with client traffic
spread 70/20/10 over them: every replica's lifecycle statistics are the fleet's (what clients were
served), every replica's `/metrics` is its own, a broken canary deployed through one replica is
rolled back once everywhere without a client seeing a failure, and an A/B test counts every
replica's requests. Nothing is mocked."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.artifacts import broken_onnx
from tests.conftest import RedisServer, Served, serve, stop
from tests.test_lifecycle_e2e import card_fraud_artifact
from tiffin.auth import mint
from tiffin.featurize import CARD_FRAUD_FEATURES

T = TypeVar("T")
pytestmark = pytest.mark.e2e
SECRET = "replicas-test-secret-0123456789abcdef"
ENV = {
    "JWT_SECRET_KEY": SECRET,
    "TIFFIN_WORKERS": "1",
    "TIFFIN_LLM_ENABLED": "false",
    "TIFFIN_TRAFFIC_POLL_INTERVAL_S": "0.1",
    "TIFFIN_METRICS_PUBLISH_INTERVAL_S": "0.25",
}
# versions of their own: the model store is shared with the other end-to-end modules
V2, BROKEN = "v2.1-fleet", "v9-fleet-broken"
SHARES = (7, 2, 1)  # of every 10 client requests, per replica


class Fleet:
    def __init__(self, replicas: list[Served]) -> None:
        self.replicas = replicas
        self.clients = [httpx.Client(base_url=r.url, timeout=30) for r in replicas]
        self.answers: Counter[str] = Counter()  # model_version of every answer clients got
        self.sent = [0] * len(replicas)  # /score/fraud requests each replica answered
        self.failures: list[str] = []
        self.card = 0

    def client_for(self, n: int) -> int:
        slot = n % sum(SHARES)
        for index, share in enumerate(SHARES[: len(self.clients)]):
            if slot < share:
                return index
            slot -= share
        return 0

    def score(self, n: int) -> str:
        """One /score/fraud request, on the replica that request number `n` goes to."""
        index = self.client_for(n)
        self.card += 1
        response = self.clients[index].post(
            "/score/fraud",
            json={"card_id": f"card_{self.card % 5000:08d}", "transaction_amount": 30.0},
        )
        self.sent[index] += 1
        if response.status_code != 200:
            self.failures.append(response.text)
            return ""
        version = response.json()["model_version"]
        self.answers[version] += 1
        return str(version)

    def load(self, requests: int) -> None:
        for n in range(requests):
            self.score(n)

    def admin(self, index: int, path: str, body: object) -> httpx.Response:
        token = mint(SECRET, "admin", 600)
        return self.clients[index].post(
            path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )

    def every(self, path: str) -> list[dict]:
        return [client.get(path).json() for client in self.clients]

    def agree(self, path: str, expected: object, key: str | None = None) -> list[object]:
        """What every replica answers at `path`, once all answer `expected` (or 10 s passed)."""
        return eventually(
            lambda: [(a[key] if key else a) for a in self.every(path)],
            lambda got: got == [expected] * 3,
        )


def eventually(values: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 10) -> T:
    """`values()` once `done` with it, else its last value after `timeout_s` (for the assertion
    to show): other replicas' counts arrive up to one publish interval late."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = values()
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(seeded_redis: RedisServer) -> Iterator[Fleet]:
    first = serve({**ENV, "REDIS_URL": seeded_redis.url}, "serve-replica-0.log")
    early = Fleet([first])
    early.load(40)  # answered before the other replicas start: their start-up must not lose them
    replicas = [first]
    try:
        with ThreadPoolExecutor(2) as pool:
            replicas += pool.map(
                lambda i: serve({**ENV, "REDIS_URL": seeded_redis.url}, f"serve-replica-{i}.log"),
                (1, 2),
            )
        fleet = Fleet(replicas)
        fleet.answers, fleet.sent[0], fleet.card = early.answers, early.sent[0], early.card
        yield fleet
    finally:
        for served in replicas:
            stop(served)


def requests_in_metrics(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ml_inference_requests_total" and s.labels.get("model") == "card_fraud"
    )


def test_every_replica_reports_what_clients_were_served(fleet: Fleet) -> None:
    registered = fleet.admin(
        0,
        "/models/register",
        {
            "name": "card_fraud",
            "version": V2,
            "artifact_base64": card_fraud_artifact(),
            "filename": "model.json",
            "feature_names": list(CARD_FRAUD_FEATURES),
            "task": "binary",
        },
    )
    assert registered.status_code == 201, registered.text
    split = fleet.admin(1, "/v1/traffic-split?model=card_fraud", {"v1.0": 80, V2: 20})
    assert split.status_code == 200, split.text
    fleet.load(1000)
    assert fleet.failures == []
    assert fleet.answers[V2] > 100
    for version in ("v1.0", V2):
        path = f"/v1/metrics/{version}?model=card_fraud"
        seen = fleet.agree(path, fleet.answers[version], "requests")
        assert seen == [fleet.answers[version]] * 3, (version, seen, fleet.answers)
    own = [requests_in_metrics(client.get("/metrics").text) for client in fleet.clients]
    assert own == fleet.sent, (own, fleet.sent)  # each its own, the first one's early ones too


def test_broken_canary_through_one_replica_is_rolled_back_once_everywhere(fleet: Fleet) -> None:
    registered = fleet.admin(
        2,
        "/models/register",
        {
            "name": "card_fraud",
            "version": BROKEN,
            "artifact_base64": broken_onnx(),
            "filename": "model.onnx",
            "feature_names": list(CARD_FRAUD_FEATURES),
            "task": "binary",
        },
    )
    assert registered.status_code == 201, registered.text
    deploy = fleet.admin(
        2,
        f"/models/card_fraud:{BROKEN}/deploy",
        {
            "strategy": "canary",
            "steps": [50, 100],
            "analysis_window_s": 60,
            "thresholds": {"min_samples": 10},
        },
    )
    assert deploy.status_code == 202, deploy.text
    deployment = f"/deployments/{deploy.json()['id']}"
    status, n, deadline = "in_progress", 0, time.monotonic() + 45
    while status == "in_progress" and time.monotonic() < deadline and n < 3000:
        for _ in range(20):
            assert fleet.score(n) != BROKEN
            n += 1
        status = fleet.clients[0].get(deployment).json()["status"]
    assert fleet.failures == []  # the canary's failures were answered by the stable version
    assert fleet.agree(deployment, "rolled_back", "status") == ["rolled_back"] * 3
    for detail in fleet.every(deployment):
        assert [t["event"] for t in detail["transitions"]].count("rolled_back") == 1
        assert "error rate" in detail["reason"]
    for events in fleet.every("/events"):
        rollbacks = [e for e in events["events"] if e["event"] == "deploy_rolled_back"]
        assert len(rollbacks) == 1
    assert fleet.agree("/v1/traffic-split?model=card_fraud", {"v1.0": 100}) == [{"v1.0": 100}] * 3
    errors = eventually(
        lambda: [e["errors"] for e in fleet.every(f"/v1/metrics/{BROKEN}?model=card_fraud")],
        lambda got: len(set(got)) == 1,
    )
    assert errors[0] >= 10 and errors == [errors[0]] * 3, errors
    assert {fleet.score(i) for i in range(30)} == {"v1.0"} and fleet.failures == []


def test_ab_test_counts_every_replicas_requests(fleet: Fleet) -> None:
    start = fleet.admin(
        1,
        "/ab-tests/start",
        {
            "test_id": "fleet-ab",
            "model_a": "card_fraud:v1.0",
            "model_b": f"card_fraud:{V2}",
            "traffic_split": 0.4,
            "duration_hours": 1,
            "success_metrics": ["error_rate", "response_time"],
        },
    )
    assert start.status_code == 201, start.text
    before = Counter(fleet.answers)
    fleet.load(600)
    assert fleet.failures == []
    served = {
        "a": fleet.answers["v1.0"] - before["v1.0"],
        "b": fleet.answers[V2] - before[V2],
    }
    assert served["a"] >= 100 and served["b"] >= 100

    def arms(answer: dict) -> dict[str, int]:
        result = answer["tests"][0]["result"]
        return {arm: result["arms"][arm]["requests"] for arm in ("a", "b")}

    counted = eventually(
        lambda: [arms(a) for a in fleet.every("/ab-tests")], lambda got: got == [served] * 3
    )
    assert counted == [served] * 3
    stopped = fleet.admin(0, "/ab-tests/fleet-ab/stop", {})
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped", stopped.text
    assert [arms(a) for a in fleet.every("/ab-tests")] == [served] * 3  # the final result


def test_drift_is_the_fleets_on_every_replica(fleet: Fleet) -> None:
    """Shifted rows sent to two replicas: every replica's `/drift` counts all of them."""
    import numpy as np

    from models import datagen

    path = "/drift/card_fraud?version=v1.0"

    def features() -> list[dict[str, dict]]:
        return [
            {f["feature"]: f for f in answer["versions"][0]["features"]}
            for answer in fleet.every(path)
        ]

    before = eventually(features, lambda got: got[0] == got[1] == got[2])
    assert before[0] == before[1] == before[2]
    seen = before[0]["transaction_amount"]["samples"]
    rows = datagen.card_fraud_dataset(np.random.default_rng(11), 400)[0]
    rows[:, list(CARD_FRAUD_FEATURES).index("transaction_amount")] *= 8.0
    for index, batch in ((0, rows[:300]), (1, rows[300:])):
        columns = {n: batch[:, j].tolist() for j, n in enumerate(CARD_FRAUD_FEATURES)}
        body = {"model_name": "card_fraud", "version": "v1.0", "features": columns}
        assert fleet.clients[index].post("/predict", json=body).status_code == 200
    after = eventually(
        features,
        lambda got: (
            all(g["transaction_amount"]["samples"] == seen + 400 for g in got)
            and got[0] == got[1] == got[2]
        ),
    )
    assert [a["transaction_amount"]["samples"] for a in after] == [seen + 400] * 3
    assert after[0] == after[1] == after[2]  # the same PSI everywhere, feature by feature
    # the earlier tests' traffic is one amount (30.0) over and over: drifted before and after
    assert after[2]["transaction_amount"]["psi"] != before[2]["transaction_amount"]["psi"]
    assert all(a["transaction_amount"]["drifted"] for a in after)
