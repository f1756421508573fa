"""Drift: reference binning, PSI, live bin counting through real Prometheus counters, and the
counts' way through the per-replica publish / fleet sum over a real redis-server."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from tests.conftest import RedisServer
from tiffin.drift import (
    MISSING,
    SLOTS,
    DriftRecorder,
    DriftSettings,
    Reference,
    bins_key,
    build_reference,
    psi,
    report,
)
from tiffin.lifecycle import stats as vm
from tiffin.lifecycle.fleet import FleetStats
from tiffin.metrics import SCORE_BUCKETS
from tiffin.model_store import ModelCard
from tiffin.replica import MetricsSettings

NAMES = ["amount", "flag", "age"]


def _rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    return np.column_stack(
        [
            rng.lognormal(3.0 + shift, 0.6, n),  # continuous
            rng.integers(0, 2, n),  # binary: two distinct values, so one edge
            rng.integers(18, 80, n),  # discrete with ties
        ]
    ).astype(np.float32)


@dataclass(frozen=True)
class Ref:
    name: str
    version: str
    card: ModelCard


def _card(reference: Reference) -> ModelCard:
    return ModelCard(
        family="drift_test",
        framework="xgboost",
        task="binary",
        feature_names=NAMES,
        reference=reference,
    )


def test_psi_is_zero_for_equal_shares_and_large_for_a_shift() -> None:
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0, abs=1e-12)
    shifted = psi([25, 25, 25, 25], [0, 0, 50, 50])
    assert shifted is not None and shifted > 1.0
    # textbook value: sum (q - p) ln(q / p)
    expected = (0.3 - 0.5) * math.log(0.3 / 0.5) + (0.7 - 0.5) * math.log(0.7 / 0.5)
    assert psi([50, 50], [30, 70]) == pytest.approx(expected, rel=1e-9)
    assert psi([0, 0], [1, 2]) is None and psi([1, 2], [0, 0]) is None


def test_reference_has_quantile_bins_a_missing_slot_and_score_buckets() -> None:
    rows = _rows(np.random.default_rng(1), 5000)
    rows[:50, 0] = np.nan
    scores = np.random.default_rng(2).uniform(0, 1, 5000)
    ref = build_reference(rows, NAMES, scores)
    amount, flag, age = (ref.features[n] for n in NAMES)
    assert len(amount.edges) == 9 and amount.counts[MISSING] == 50
    shares = np.asarray(amount.counts[:10]) / 4950
    assert np.all(np.abs(shares - 0.1) < 0.01)  # deciles hold a tenth each
    assert flag.edges == [1.0] and sum(flag.counts) == 5000 and flag.counts[2:] == [0.0] * 9
    assert len(age.edges) == len(set(age.edges)) <= 9
    assert ref.score is not None and len(ref.score) == len(SCORE_BUCKETS) + 1
    assert sum(ref.score) == 5000 and ref.rows == 5000


def _live(model: str, version: str) -> vm.Snapshot:
    return vm.collect(REGISTRY.collect(), model)[model][version]


def test_live_bins_are_the_reference_bins_and_unshifted_traffic_has_no_drift() -> None:
    rng = np.random.default_rng(3)
    train = _rows(rng, 4000)
    reference = build_reference(train, NAMES, None)
    recorder = DriftRecorder(DriftSettings())
    ref = Ref("drift_same", "v1", _card(reference))
    # the reference rows themselves, in requests of a few rows (binned in Python) and batches
    # (binned by numpy): both must put every value, edges included, where the reference did
    for batch in [*np.array_split(train[:400], 100), *np.array_split(train[400:], 36)]:
        recorder.record(ref, batch)
    recorder.record(ref, train[:1])  # and one single row
    live = _live("drift_same", "v1")
    for name in NAMES:
        expected = np.asarray(reference.features[name].counts)
        expected[
            np.searchsorted(reference.features[name].edges, train[0, NAMES.index(name)], "right")
        ] += 1
        assert live[bins_key(name)] == expected.tolist(), name
    judged = report("drift_same", "v1", reference, live, DriftSettings())
    assert not judged["drifted"] and judged["samples"] == 4001
    assert all(f["psi"] < 0.01 for f in judged["features"])


def test_a_shifted_feature_is_flagged_and_the_others_are_not() -> None:
    rng = np.random.default_rng(4)
    reference = build_reference(_rows(rng, 4000), NAMES, None)
    recorder = DriftRecorder(DriftSettings())
    ref = Ref("drift_shift", "v1", _card(reference))
    live_rows = _rows(rng, 2000, shift=1.0)  # amounts ~e times larger
    live_rows[:100, 2] = np.nan  # 5% missing ages, where training had none: drift too
    recorder.record(ref, live_rows)
    recorder.record(ref, live_rows[:1])  # a single row's missing age goes to the same slot
    live = _live("drift_shift", "v1")
    assert live[bins_key("age")][MISSING] == 101
    judged = report("drift_shift", "v1", reference, live, DriftSettings(min_samples=100))
    by_name = {f["feature"]: f for f in judged["features"]}
    assert by_name["amount"]["drifted"] and by_name["amount"]["psi"] > 0.2
    assert not by_name["flag"]["drifted"] and by_name["flag"]["psi"] < 0.05
    assert set(judged["drifted_features"]) == {"amount", "age"}
    assert judged["drifted_features"][0] == "amount"  # largest PSI first
    # what the alert rule reads: the same PSI on the gauge
    gauge = {"model": "drift_shift", "version": "v1", "feature": "amount"}
    assert REGISTRY.get_sample_value("ml_feature_drift_psi", gauge) == by_name["amount"]["psi"]
    # too few samples: never flagged, whatever the PSI, and no gauge for the alert to page on
    quiet = report("drift_quiet", "v1", reference, live, DriftSettings(min_samples=10_000))
    assert not quiet["drifted"] and quiet["features"][0]["psi"] > 0.2
    gauge["model"] = "drift_quiet"
    assert REGISTRY.get_sample_value("ml_feature_drift_psi", gauge) is None


def test_a_version_without_reference_is_reported_not_failed() -> None:
    out = report("m", "v0", None, None, DriftSettings())
    assert out["reference"] is None and "reference" in out["reason"]
    card = ModelCard.model_validate(  # an old card, saved before drift tracking, still loads
        {"family": "m", "framework": "onnx", "task": "binary", "feature_names": ["a"]}
    )
    recorder = DriftRecorder(DriftSettings())
    recorder.record(Ref("m", "v0", card), np.ones((2, 1), np.float32))  # nothing to count


def test_sampling_counts_a_fraction_of_requests() -> None:
    reference = build_reference(_rows(np.random.default_rng(5), 500), NAMES, None)
    recorder = DriftRecorder(DriftSettings(sample_rate=0.25))
    ref = Ref("drift_sampled", "v1", _card(reference))
    row = _rows(np.random.default_rng(6), 1)
    for _ in range(4000):
        recorder.record(ref, row)
    seen = sum(_live("drift_sampled", "v1")[bins_key("amount")])
    assert 850 < seen < 1150


def test_on_the_event_loop_counts_reach_the_counters_within_the_flush_interval() -> None:
    import asyncio

    reference = build_reference(_rows(np.random.default_rng(9), 500), NAMES, None)
    recorder = DriftRecorder(DriftSettings(flush_interval_s=0.05))
    ref = Ref("drift_timed", "v1", _card(reference))

    async def serve() -> tuple[float, float]:
        for _ in range(30):
            recorder.record(ref, _rows(np.random.default_rng(10), 1))
        before = sum(_live_or_empty("drift_timed", "v1").get(bins_key("flag"), [0.0]))
        await asyncio.sleep(0.2)
        return before, sum(_live("drift_timed", "v1")[bins_key("flag")])

    before, after = asyncio.run(serve())
    assert before == 0 and after == 30  # pending first, then one flush for all 30 requests


def _live_or_empty(model: str, version: str) -> vm.Snapshot:
    return vm.collect(REGISTRY.collect(), model).get(model, {}).get(version, {})


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer().start()
    yield server.url
    server.stop()


def test_drift_counts_are_published_and_summed_over_replicas(redis_url: str) -> None:
    """What a replica publishes includes its bin counts; every replica reads the fleet's sum."""
    reference = build_reference(_rows(np.random.default_rng(7), 1000), NAMES, None)
    recorder = DriftRecorder(DriftSettings())
    ref = Ref("drift_fleet", "v1", _card(reference))
    recorder.record(ref, _rows(np.random.default_rng(8), 300))
    mine = vm.collect(REGISTRY.collect(), "drift_fleet")
    other = {"drift_fleet": {"v1": {**vm.empty(), bins_key("amount"): [5.0] * SLOTS}}}
    settings = MetricsSettings(publish_interval_s=0.05)
    client = redis.Redis.from_url(redis_url)
    a = FleetStats(client, "test:drift:stats", "a", settings, lambda: mine)
    b = FleetStats(client, "test:drift:stats", "b", settings, lambda: other)
    a.publish()
    b.publish()
    published = json.loads(client.hget("test:drift:stats:live", "a"))
    assert sum(published["drift_fleet"]["v1"][bins_key("flag")]) == 300
    for fleet in (a, b):
        snap = fleet.snapshot("drift_fleet")["v1"]
        assert sum(snap[bins_key("amount")]) == 300 + 5 * SLOTS
        assert sum(snap[bins_key("flag")]) == 300


def test_an_imported_version_keeps_the_reference_of_the_rows_it_came_with() -> None:
    import bentoml
    from sklearn.linear_model import LogisticRegression

    from models import datagen, importer
    from models.train import _sklearn_artifacts
    from tiffin import model_store
    from tiffin.errors import ModelLoadError

    x, y = datagen.two_feature_dataset(np.random.default_rng(12), 800)
    onnx = _sklearn_artifacts(LogisticRegression().fit(x, y), 2)["model.onnx"]
    metadata = {"feature_names": ["feature1", "feature2"], "task": "binary"}
    with pytest.raises(ModelLoadError, match=r"^reference_rows: expected rows of 2 values"):
        importer.import_version(
            "drift_imported", "1", {"model.onnx": onnx}, metadata, False, x[:, :1]
        )
    assert not model_store.exists("drift_imported", "1")  # nothing saved on a bad reference
    importer.import_version("drift_imported", "1", {"model.onnx": onnx}, metadata, False, x)
    try:
        card = model_store.card_of(model_store.get("drift_imported", "1"))
        assert card.reference is not None and card.reference.rows == 800
        assert card.reference.score is not None and sum(card.reference.score) == 800
        assert set(card.reference.features) == {"feature1", "feature2"}
    finally:
        bentoml.models.delete("drift_imported:1")
