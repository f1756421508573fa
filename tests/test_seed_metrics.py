"""Every metric name the seeds list, on a real application's `/metrics` after real scoring
requests: with the seeds' labels, the same counts as the families they are derived from, in text
`prometheus_client`'s parser reads; in one process and over several worker processes sharing a
multiprocess directory (as under `bentoml serve`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests import seed_bodies as seed
from tiffin.app import TiffinApp, local_app
from tiffin.limits import LimitsMiddleware

REPO = Path(__file__).resolve().parent.parent

SEED_NAMES: dict[str, tuple[str, set[str]]] = {
    # text-format name: (type, labels every series carries besides `le`)
    # seed 000
    "ml_inference_requests_total": ("counter", {"model", "version", "status"}),
    "ml_inference_duration_seconds": ("histogram", {"model", "version"}),
    "ml_inference_errors_total": ("counter", {"model", "version", "type"}),
    "ml_model_load_time_seconds": ("gauge", {"model", "version"}),
    "ml_active_models": ("gauge", {"model", "version"}),
    # seed 001
    "inference_requests_total": ("counter", {"model_name", "model", "version", "status"}),
    "inference_request_duration_seconds": ("histogram", {"model_name", "model", "version"}),
    "inference_active_requests": ("gauge", set()),
    "feature_fetch_duration_seconds": ("histogram", {"model", "version", "backend"}),
    "model_inference_duration_seconds": ("histogram", {"model_name", "model", "version"}),
    "prediction_scores": ("histogram", {"model", "version"}),
    "inference_errors_total": ("counter", {"model_name", "model", "version", "type"}),
    # seed 002 (and its circuit breaker, which the LLM runtime sets)
    "ml_inference_request_duration_seconds": ("histogram", {"model_name", "model", "version"}),
    "ml_inference_circuit_breaker_state": ("gauge", {"backend"}),
    "ml_inference_memory_usage_percent": ("gauge", set()),
    "ml_inference_health_score": ("gauge", set()),
    # seed 003
    "inference_latency_seconds": ("histogram", {"model_name", "model", "version"}),
}
DERIVED = {  # seed name: the family it repeats (text-format names)
    "inference_requests_total": "ml_inference_requests_total",
    "inference_request_duration_seconds": "ml_inference_duration_seconds",
    "ml_inference_request_duration_seconds": "ml_inference_duration_seconds",
    "inference_latency_seconds": "ml_inference_duration_seconds",
    "inference_errors_total": "ml_inference_errors_total",
}


@pytest.fixture(scope="module")
def tiffin(model_store: str) -> TiffinApp:
    return local_app()


def families(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """Text-format name: (type, samples), `_created` samples left out."""
    out = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        out[name] = (family.type, samples)
    return out


def series(samples: list[Sample], drop: tuple[str, ...] = ()) -> dict[Any, float]:
    return {
        (
            s.name.rsplit("_", 1)[-1] if s.name.endswith(("_bucket", "_sum", "_count")) else "",
            tuple(sorted((k, v) for k, v in s.labels.items() if k not in drop)),
        ): s.value
        for s in samples
    }


def run(app: Any, calls: Callable[[httpx.AsyncClient], Any]) -> Any:
    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiffin") as client:
            return await calls(client)

    return asyncio.run(main())


def score(app: Any, times: int = 3) -> None:
    async def calls(client: httpx.AsyncClient) -> None:
        for _ in range(times):
            for path, body in (
                ("/score/fraud", seed.CARD_FRAUD),
                ("/predict/ctr", seed.CTR),
                ("/predict", seed.GENERIC),
                ("/score/batch", seed.BATCH),
            ):
                response = await client.post(path, json=body)
                assert response.status_code == 200, response.text

    run(app, calls)


@contextmanager
def failing_predictions(tiffin: TiffinApp, family: str) -> Iterator[None]:
    """The family's model raises, as a broken model version would."""
    assert tiffin.worker.families is not None
    found = tiffin.worker.families.find(family)
    assert found is not None

    async def broken(*_: Any) -> Any:
        raise RuntimeError("model exploded")

    found.predict = broken  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del found.predict  # the class's method again


def scrape(app: Any) -> str:
    async def calls(client: httpx.AsyncClient) -> str:
        response = await client.get("/metrics")
        assert response.status_code == 200
        return response.text

    text: str = run(app, calls)
    return text


def test_every_seed_metric_name_is_served_with_its_labels(tiffin: TiffinApp) -> None:
    app = LimitsMiddleware(tiffin)  # as service.py stacks it
    score(app)
    with failing_predictions(tiffin, "card_fraud"):
        response = run(app, lambda c: c.post("/score/fraud", json=seed.CARD_FRAUD))
    assert response.status_code == 503
    text = scrape(app)
    found = families(text)
    for name, (kind, labels) in SEED_NAMES.items():
        assert name in found, name
        found_kind, samples = found[name]
        assert found_kind == kind, name
        assert samples, name
        for sample in samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
            if "model_name" in labels:
                assert sample.labels["model_name"] == sample.labels["model"]
    # one HELP and one TYPE line per family
    for prefix in ("# HELP ", "# TYPE "):
        names = [line.split()[2] for line in text.splitlines() if line.startswith(prefix)]
        assert len(names) == len(set(names)), prefix
    errors = found["inference_errors_total"][1]
    assert any(
        s.labels["model_name"] == "card_fraud" and s.labels["type"] == "predict" for s in errors
    )


def test_derived_names_count_exactly_what_their_sources_count(tiffin: TiffinApp) -> None:
    app = LimitsMiddleware(tiffin)
    score(app, times=9)  # every pipeline's stage times are sampled at least once
    with failing_predictions(tiffin, "card_fraud"):
        run(app, lambda c: c.post("/score/fraud", json=seed.CARD_FRAUD))
    found = families(scrape(app))
    for name, source in DERIVED.items():
        got = series(found[name][1], drop=("model_name",))
        want = series(found[source][1])
        assert got == want, name
        assert got, name
    histogram = found["inference_latency_seconds"][1]
    counts = [s.value for s in histogram if s.name.endswith("_bucket")]
    assert counts and max(counts) > 0
    stages = [s for s in found["ml_pipeline_stage_seconds"][1] if s.labels["stage"] == "predict"]
    assert series(found["model_inference_duration_seconds"][1], drop=("model_name",)) == series(
        stages, drop=("stage",)
    )
    requests = {
        (s.labels["model"], s.labels["status"]): s.value
        for s in found["ml_inference_requests_total"][1]
    }
    assert requests[("card_fraud", "error")] >= 1
    (rss,) = found["tiffin_process_resident_memory_bytes"][1]
    (limit,) = found["tiffin_memory_limit_bytes"][1]
    (percent,) = found["ml_inference_memory_usage_percent"][1]
    assert percent.value == pytest.approx(100 * rss.value / limit.value, abs=1e-3)
    assert 0 < percent.value < 100


def test_health_score_is_the_share_of_healthy_components_health_reports(
    tiffin: TiffinApp,
) -> None:
    health = run(tiffin, lambda c: c.get("/health")).json()
    (score,) = families(scrape(tiffin))["ml_inference_health_score"][1]
    statuses = [c["status"] for c in health["components"].values()]
    assert score.value == sum(s in ("ok", "disabled") for s in statuses) / len(statuses)
    assert (score.value == 1.0) == (health["status"] == "ok")


def test_active_requests_counts_requests_in_flight_but_not_the_scrape(tiffin: TiffinApp) -> None:
    app = LimitsMiddleware(tiffin)
    assert tiffin.worker.families is not None
    family = tiffin.worker.families.find("card_fraud")
    assert family is not None
    real = family.predict

    async def calls(client: httpx.AsyncClient) -> list[float]:
        release = asyncio.Event()
        arrived = asyncio.Semaphore(0)

        async def held(*args: Any) -> Any:
            arrived.release()
            await release.wait()
            return await real(*args)

        def active(text: str) -> float:
            (sample,) = families(text)["inference_active_requests"][1]
            return sample.value

        family.predict = held  # type: ignore[method-assign,assignment]
        try:
            before = active((await client.get("/metrics")).text)
            pending = [
                asyncio.create_task(client.post("/score/fraud", json=seed.CARD_FRAUD))
                for _ in range(3)
            ]
            for _ in pending:
                await arrived.acquire()
            during = active((await client.get("/metrics")).text)
            release.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*pending))
            after = active((await client.get("/metrics")).text)
        finally:
            del family.predict
        return [before, during, after]

    assert run(app, calls) == [0, 3, 0]


def test_a_runners_own_metrics_carry_the_derived_names(tiffin: TiffinApp) -> None:
    """A runner served on its own answers `/metrics` with `RunnerMetrics`: the same exposition,
    so what its workers recorded comes with its seed names too."""
    from tiffin.runner_base import RunnerMetrics

    score(tiffin, times=1)
    found = families(scrape(RunnerMetrics(tiffin)))
    for name, source in DERIVED.items():
        assert series(found[name][1], drop=("model_name",)) == series(found[source][1]), name
    assert "ml_inference_memory_usage_percent" in found


WORKER = """
import asyncio, json, os, sys
import httpx
from tests import seed_bodies as seed
from tiffin.app import local_app
from tiffin.limits import LimitsMiddleware
from tiffin.metrics import exposition

hold = int(sys.argv[1])
tiffin = local_app()
app = LimitsMiddleware(tiffin)
family = tiffin.worker.families.find("card_fraud")

async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
        for _ in range(8):
            for path, body in (("/score/fraud", seed.CARD_FRAUD), ("/predict/ctr", seed.CTR)):
                assert (await client.post(path, json=body)).status_code == 200
        arrived = asyncio.Semaphore(0)
        async def held(*args):
            arrived.release()
            await asyncio.Event().wait()
        family.predict = held
        held_requests = [  # referenced: a pending task nobody holds is collected, and closed
            asyncio.create_task(client.post("/score/fraud", json=seed.CARD_FRAUD))
            for _ in range(hold)
        ]
        for _ in range(hold):
            await arrived.acquire()
        sys.stdout.write(exposition()[0].decode())
        sys.stdout.flush()
        os._exit(len(held_requests) - hold)  # in flight still, as a worker scraped mid-traffic

asyncio.run(main())
"""


def test_seed_names_over_several_worker_processes(model_store: str, tmp_path: Path) -> None:
    """Two processes with one multiprocess directory, as two `bentoml serve` workers: the
    derived names sum both, the in-flight gauge is the sum of both workers' requests."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    texts = [
        subprocess.run(
            [sys.executable, "-c", WORKER, str(hold)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
        for hold in (1, 2)
    ]
    found = families(texts[-1])  # the second worker's scrape sees both workers
    (active,) = found["inference_active_requests"][1]
    assert active.value == 3
    requests = series(found["ml_inference_requests_total"][1])
    assert (
        requests[("", (("model", "card_fraud"), ("status", "success"), ("version", "v1.0")))] == 16
    )
    for name, source in DERIVED.items():
        if name != "inference_errors_total":  # no errors in these workers
            assert series(found[name][1], drop=("model_name",)) == series(found[source][1]), name
    assert "model_inference_duration_seconds" in found
    assert "ml_inference_memory_usage_percent" in found
