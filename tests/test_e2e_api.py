"""End to end: a real `bentoml serve` (two workers) over a seeded real Redis, called with the
seeds' request bodies through `bentoml.SyncHTTPClient` and plain HTTP, once per runner topology:
in-process, separate processes, and remote runners each under their own `bentoml serve`."""

from __future__ import annotations

import time

import bentoml
import httpx
import pytest

from tests import seed_bodies as seed
from tests.conftest import Served, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiffin(stack: Stack) -> Served:
    return stack.entry


@pytest.fixture(scope="module")
def client(tiffin: Served):
    with bentoml.SyncHTTPClient(tiffin.url, timeout=30) as c:
        yield c


def post(served: Served, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=body, timeout=30)


SEED_001_FRAUD_KEYS = {
    "fraud_score",
    "risk_level",
    "confidence",
    "recommended_action",
    "explanation",
    "top_risk_factors",
    "features_used",
    "latency_ms",
    "model_version",
    "feature_freshness_sec",
}
SEED_001_PERSONALIZATION_KEYS = {
    "relevance_score",
    "conversion_probability",
    "engagement_score",
    "user_segment",
    "behavioral_signals",
    "features_used",
    "latency_ms",
    "model_version",
}


def feature_report(response: httpx.Response) -> dict[str, object]:
    """The single endpoints' feature provenance, carried in headers (the body is the seed's)."""
    defaults = response.headers.get("x-tiffin-feature-defaults")
    return {
        "source": response.headers["x-tiffin-feature-source"],
        "defaults_used": defaults.split(",") if defaults else [],
        "degraded": response.headers["x-tiffin-feature-degraded"] == "true",
    }


def test_score_fraud_seed_example_has_every_seed_field(client, tiffin: Served) -> None:
    out = client.score_fraud(**seed.CARD_FRAUD)
    assert set(out) == SEED_001_FRAUD_KEYS  # the seed's body exactly, nothing added
    assert 0.0 <= out["fraud_score"] <= 1.0
    assert out["confidence"] == pytest.approx(
        max(out["fraud_score"], 1 - out["fraud_score"]), abs=1e-6
    )
    assert out["features_used"] == 16
    assert out["model_version"] == "v1.0"
    response = post(tiffin, "/score/fraud", seed.CARD_FRAUD)
    assert feature_report(response) == {"source": "redis", "defaults_used": [], "degraded": False}
    # the seeding command stamps records up to 300 s back; freshness is measured, not invented
    assert 0 <= out["feature_freshness_sec"] <= 400


def test_high_risk_merchant_raises_score_and_names_merchant_risk(client) -> None:
    ordinary = client.score_fraud(**seed.CARD_FRAUD)
    risky = client.score_fraud(**seed.CARD_FRAUD_HIGH_RISK)
    assert risky["fraud_score"] > ordinary["fraud_score"]
    assert risky["top_risk_factors"][0] == "merchant_risk"
    assert risky["recommended_action"] in ("review", "decline")


def test_unknown_card_falls_back_to_defaults_and_says_so(tiffin: Served) -> None:
    response = post(
        tiffin, "/score/fraud", {"card_id": "card_never_seen", "transaction_amount": 42}
    )
    assert feature_report(response)["defaults_used"] == ["card:card_never_seen"]
    assert response.json()["feature_freshness_sec"] is None


def test_score_fraud_can_add_a_schema_valid_llm_explanation(client) -> None:
    from tiffin.llm.response_models import FraudExplanation

    out = client.score_fraud(**seed.CARD_FRAUD, llm_explanation=True)
    assert out["llm_explanation_source"] in ("llm", "rules")
    explanation = FraudExplanation.model_validate(out["llm_explanation"])
    assert explanation.risk_level in ("low", "medium", "high")
    plain = client.score_fraud(**seed.CARD_FRAUD)
    assert set(plain) == SEED_001_FRAUD_KEYS and plain["fraud_score"] == out["fraud_score"]


def test_personalization_seed_example(client, tiffin: Served) -> None:
    out = client.score_personalization(**seed.PERSONALIZATION)
    assert set(out) == SEED_001_PERSONALIZATION_KEYS  # the seed's body exactly
    assert out["features_used"] == 12
    assert all(
        0 <= out[k] <= 1 for k in ("relevance_score", "conversion_probability", "engagement_score")
    )
    response = post(tiffin, "/score/personalization", seed.PERSONALIZATION)
    assert feature_report(response)["defaults_used"] == ["session:session_abc123"]


def test_score_batch_seed_example(client) -> None:
    out = client.score_batch(**seed.BATCH)
    assert out["batch_id"] == "batch_20240902_001"
    assert [r["card_id"] for r in out["results"]] == ["card_1", "card_2"]
    single = client.score_fraud(card_id="card_2", transaction_amount=500)
    assert out["results"][1]["fraud_score"] == pytest.approx(single["fraud_score"], abs=1e-6)


def test_batch_rows_equal_single_requests(tiffin: Served) -> None:
    """The batch path scores a whole batch at once; each row must still be what the single
    endpoint answers for that transaction (found, unknown and absent entities mixed)."""
    items = [
        {"card_id": f"card_{i:08d}", "transaction_amount": 20.0 + 97 * i, "merchant_id": m}
        for i, m in enumerate(["merchant_00001", None, "merchant_unknown", "merchant_00002"] * 8)
    ]
    items += [
        {"card_id": "card_never_seen", "transaction_amount": 4000, "mcc_code": "7995"},
        {"card_id": "card_00000003", "transaction_amount": 75, "country_code": "ng"},
    ]
    scored_at = time.monotonic()
    batch = post(tiffin, "/score/batch", {"model_type": "card_fraud", "requests": items})
    assert batch.status_code == 200, batch.text
    rows = batch.json()["results"]
    assert len(rows) == len(items)
    volatile = {"latency_ms", "feature_freshness_sec"}
    for item, row in zip(items, rows, strict=True):
        response = post(tiffin, "/score/fraud", item)
        single = response.json()
        # a row is the single answer plus what tells rows apart (card id, feature report)
        assert row.pop("card_id") == item["card_id"]
        assert row.pop("features") == feature_report(response)
        assert {k: v for k, v in row.items() if k not in volatile} == {
            k: v for k, v in single.items() if k not in volatile
        }
        if row["feature_freshness_sec"] is not None:  # the records aged while we asked again
            aged = single["feature_freshness_sec"] - row["feature_freshness_sec"]
            assert -1 <= aged <= time.monotonic() - scored_at + 1
    batch_rows = batch.json()["results"]
    assert batch_rows[-2]["features"]["defaults_used"] == ["card:card_never_seen"]
    assert batch_rows[2]["features"]["defaults_used"] == ["merchant:merchant_unknown"]
    assert any(r["top_risk_factors"] for r in rows)


def test_personalization_batch_rows_equal_single_requests(tiffin: Served) -> None:
    items = [
        {"user_id": f"user_{i:08d}", "item_id": item, "session_id": session}
        for i, (item, session) in enumerate(
            [("item_electronics_001", "session_abc123"), ("item_never_seen", None)] * 6
        )
    ]
    items.append({"user_id": "user_nobody", "item_id": "i", "item_category": "books"})
    batch = post(tiffin, "/score/batch", {"model_type": "personalization", "requests": items})
    assert batch.status_code == 200, batch.text
    rows = batch.json()["results"]
    for item, row in zip(items, rows, strict=True):
        response = post(tiffin, "/score/personalization", item)
        single = response.json()
        assert (row.pop("user_id"), row.pop("item_id")) == (item["user_id"], item["item_id"])
        assert row.pop("features") == feature_report(response)
        freshness = response.headers.get("x-tiffin-feature-freshness-sec")
        assert (row.pop("feature_freshness_sec") is None) == (freshness is None)
        del row["latency_ms"], single["latency_ms"]
        assert row == single
    assert batch.json()["results"][-1]["features"]["defaults_used"] == [
        "user:user_nobody",
        "item:i",
    ]


def test_seed_000_endpoints(client) -> None:
    fraud = client.predict_fraud(**seed.AD_FRAUD)
    assert 0 <= fraud["fraud_probability"] <= 1 and fraud["model_version"] == "1.0.0"
    ctr = client.predict_ctr(**seed.CTR)
    assert 0 < ctr["predicted_ctr"] < 1
    bid = client.predict_bid(**seed.BID)
    assert bid["recommended_bid_cpm"] >= seed.BID["floor_cpm"]


def test_generic_predict_and_batch(client, tiffin: Served) -> None:
    out = client.predict(**seed.GENERIC)
    assert out["correlation_id"] == "test-123"
    assert len(out["prediction"]) == 3 and set(out["probabilities"]) == {"class_0", "class_1"}
    for p0, p1 in zip(
        out["probabilities"]["class_0"], out["probabilities"]["class_1"], strict=True
    ):
        assert p0 + p1 == pytest.approx(1.0, abs=1e-5)
    batch = post(
        tiffin, "/predict/batch", {"requests": [seed.GENERIC, seed.GENERIC], "batch_size": 10}
    )
    assert batch.status_code == 200 and len(batch.json()) == 2


def test_generic_predict_reaches_family_models(client) -> None:
    features = {name: [1.0] for name in client_feature_names(client, "card_fraud")}
    out = client.predict(model_name="card_fraud", features=features)
    assert out["model_version"] == "v1.0" and len(out["prediction"]) == 1


def client_feature_names(client, name: str) -> list[str]:
    from tiffin.featurize import CARD_FRAUD_FEATURES

    assert name == "card_fraud"
    return list(CARD_FRAUD_FEATURES)


def test_seed_004_api_docs_page(tiffin: Served) -> None:
    """Seed 004 lists its API docs at /docs: the interactive page, reading Tiffin's document."""
    page = httpx.get(f"{tiffin.url}/docs", timeout=30)
    assert page.status_code == 200, page.text[:300]
    assert page.headers["content-type"].startswith("text/html")
    document = httpx.get(f"{tiffin.url}/docs.json", timeout=30).json()
    assert "/score/fraud" in document["paths"]


def test_v1_models_predict_by_version(tiffin: Served) -> None:
    quantized = post(tiffin, "/v1/models/predict", seed.V1_PREDICT).json()
    assert quantized["model_version"] == "v2-quantized" and quantized["predictions"] == ["setosa"]
    default = post(tiffin, "/v1/models/predict", {"instances": [[6.7, 3.0, 5.8, 2.2]]}).json()
    assert default["model_version"] == "v1" and default["predictions"] == ["virginica"]
    listing = httpx.get(f"{tiffin.url}/v1/models").json()["models"]
    species = next(m for m in listing if m["name"] == "species_classifier")
    assert set(species["versions"]) == {"v1", "v2", "v2-quantized"}


def test_health_ready_models(tiffin: Served) -> None:
    health = httpx.get(f"{tiffin.url}/health").json()
    assert health["status"] == "ok"
    assert health["models_loaded"] >= 7 and health["uptime_seconds"] > 0
    assert health["components"]["feature_store"]["backend"] == "redis"
    assert httpx.get(f"{tiffin.url}/ready").status_code == 200
    for probe in ("/livez", "/readyz"):
        assert httpx.get(f"{tiffin.url}{probe}").status_code == 200
    models = httpx.get(f"{tiffin.url}/models").json()["models"]
    card = next(m for m in models if m["name"] == "card_fraud")
    version = card["versions"][0]
    assert version["feature_names"][0] == "transaction_amount" and version["metrics"]["auc"] > 0.7
    assert version["state"] == "loaded"
    assert httpx.get(f"{tiffin.url}/models/card_fraud").json()["name"] == "card_fraud"


def test_metrics_are_labelled_by_model_and_version(stack: Stack, client) -> None:
    for _ in range(6):  # several requests so both workers have served some
        client.score_fraud(**seed.CARD_FRAUD)
    text = httpx.get(f"{stack.entry.url}/metrics").text
    for name in (
        "ml_inference_requests_total",
        "ml_inference_duration_seconds_bucket",
        "feature_fetch_duration_seconds_bucket",
        "prediction_scores_bucket",
        "ml_pipeline_stage_seconds_bucket",
    ):
        assert f"{name}{{" in text, name
    # models load where their runner runs: a remote runner's server reports its own loads
    runners = [httpx.get(f"{r.url}/metrics").text for r in stack.runners.values()]
    for name in ("ml_model_load_time_seconds", "ml_active_models"):
        assert any(f"{name}{{" in t for t in (text, *runners)), name
    for stage in ("route", "features", "predict", "respond"):
        assert f'stage="{stage}"' in text, stage
    assert 'ml_inference_requests_total{model="card_fraud",status="success",version="v1.0"}' in text


@pytest.mark.parametrize(
    ("path", "body", "status", "names"),
    [
        ("/score/fraud", {"card_id": "c"}, 400, "transaction_amount"),
        ("/score/fraud", {"card_id": "c", "transaction_amount": -1}, 400, "transaction_amount"),
        ("/score/fraud", {"card_id": "c", "transaction_amount": "x"}, 400, "transaction_amount"),
        (
            "/score/fraud",
            {"card_id": "c", "transaction_amount": 5, "mcc_code": "54"},
            400,
            "mcc_code",
        ),
        ("/predict", {"model_name": "nope", "features": {"a": [1]}}, 404, "nope"),
        ("/predict", {**seed.GENERIC, "version": "9.9"}, 404, "9.9"),
        ("/predict", {"model_name": "bad name!", "features": {"a": [1]}}, 404, "model_name"),
        ("/predict", {**seed.GENERIC, "version": "v 9!"}, 404, "version"),
        ("/predict", {"model_name": "your_model", "features": {"feature1": [1]}}, 422, "feature2"),
        (
            "/predict",
            {"model_name": "your_model", "features": {"feature1": [1], "feature2": [1, 2]}},
            422,
            "features",
        ),
        ("/score/batch", {"model_type": "fraud_detection", "requests": []}, 400, "requests"),
        (
            "/score/batch",
            {"model_type": "fraud_detection", "requests": [{"card_id": "c"}] * 5000},
            400,
            "requests",
        ),
        (
            "/score/batch",
            {
                "model_type": "fraud_detection",
                "requests": [{"card_id": "c", "transaction_amount": 1}, {"card_id": "d"}],
            },
            422,
            "requests[1].transaction_amount",
        ),
        ("/score/batch", {"model_type": "weather", "requests": [{}]}, 400, "model_type"),
        ("/v1/models/predict", {"instances": [[1, 2]]}, 422, "instances"),
        ("/v1/models/predict", {"instances": [[1, 2, 3, 4]], "version": "v9"}, 404, "v9"),
        ("/v1/models/predict", {"instances": [[1, 2, 3, 4]], "version": "v 9!"}, 404, "version"),
        ("/predict/ctr", {**seed.CTR, "ad_format": "hologram"}, 400, "ad_format"),
        ("/predict/fraud", {**seed.AD_FRAUD, "ip_address": "999.1.1.1"}, 400, "ip_address"),
        ("/predict/bid", {**seed.BID, "competition_level": "fierce"}, 400, "competition_level"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_problem(tiffin: Served, path, body, status, names) -> None:
    response = post(tiffin, path, body)
    assert response.status_code == status, response.text
    assert names in response.json()["error"]


def test_input_that_overflows_the_model_is_the_clients_error(tiffin: Served) -> None:
    """Huge numbers make the model answer NaN: a 422 naming the feature, not a failure of the
    version (which canary analysis would read)."""
    stats = f"{tiffin.url}/v1/metrics/1.0.0?model=your_model"
    before = httpx.get(stats).json()["errors"]
    body = {"model_name": "your_model", "features": {"feature1": [3e38], "feature2": [3e38]}}
    response = post(tiffin, "/predict", body)
    assert response.status_code == 422, response.text
    assert "feature1" in response.json()["error"]
    assert httpx.get(stats).json()["errors"] == before


def test_non_json_body_is_a_400(tiffin: Served) -> None:
    response = httpx.post(
        f"{tiffin.url}/score/fraud",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


def test_redis_outage_degrades_instead_of_failing(client, tiffin: Served, stack: Stack) -> None:
    """Runs after the others of its topology: it stops the stack's Redis."""
    stack.redis.stop()
    response = post(tiffin, "/score/fraud", seed.CARD_FRAUD)
    assert response.status_code == 200, response.text
    report = feature_report(response)
    assert report["degraded"] is True
    assert report["defaults_used"] == ["card:card_00001234", "merchant:merchant_12345"]
    assert response.json()["feature_freshness_sec"] is None
    health = httpx.get(f"{tiffin.url}/health").json()
    assert health["status"] == "degraded"
    assert health["components"]["feature_store"]["status"] in ("down", "degraded")


def test_64_clients_for_30_seconds_get_only_2xx(stack: Stack) -> None:
    """BentoML's hop between processes used to drop requests under load (docs/upstream.md)."""
    if stack.topology != "separate":
        pytest.skip("the load check is for the separate-processes topology")
    import asyncio
    from collections import Counter

    async def load() -> Counter[str]:
        statuses: Counter[str] = Counter()
        # The client forgets idle connections before the server closes them (uvicorn: 5 s,
        # httpx's default: also 5 s). With equal timeouts a request can go out on a connection
        # the server closes at that instant, a ReadError that says nothing about Tiffin (seen
        # once in ~6,000 requests while this CPU-starved client left some connections idle).
        limits = httpx.Limits(
            max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0
        )
        async with httpx.AsyncClient(base_url=stack.entry.url, timeout=60, limits=limits) as c:
            deadline = time.monotonic() + 30

            async def one(i: int) -> None:
                n = 0
                while time.monotonic() < deadline:
                    body = {**seed.CARD_FRAUD, "card_id": f"card_{(i * 997 + n) % 6000:08d}"}
                    try:
                        r = await c.post("/score/fraud", json=body)
                        statuses[str(r.status_code)] += 1
                    except httpx.HTTPError as exc:
                        statuses[type(exc).__name__] += 1
                    n += 1

            await asyncio.gather(*(one(i) for i in range(64)))
        return statuses

    statuses = asyncio.run(load())
    assert set(statuses) == {"200"}, statuses
    assert statuses["200"] > 64


def test_a_remote_runner_that_is_down_is_a_503_naming_it(stack: Stack) -> None:
    """Runs last: it stops one of the stack's runners."""
    if stack.topology != "remote":
        pytest.skip("only remote runners can be stopped on their own")
    from tests.conftest import stop

    stop(stack.runners["ctr_prediction"])
    started = time.monotonic()
    response = post(stack.entry, "/predict/ctr", seed.CTR)
    assert response.status_code == 503, response.text
    assert "ctr_prediction" in response.json()["error"]
    assert time.monotonic() - started < 15
    health = httpx.get(f"{stack.entry.url}/health", timeout=30).json()
    assert health["status"] == "degraded"
    assert health["components"]["runners"]["down"] == ["ctr_prediction"]
    assert httpx.get(f"{stack.entry.url}/readyz", timeout=30).status_code != 200
    assert post(stack.entry, "/score/fraud", seed.CARD_FRAUD).status_code == 200
