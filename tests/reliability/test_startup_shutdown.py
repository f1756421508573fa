"""Readiness from the first second of a real `bentoml serve`, SIGTERM with requests in flight,
and a model that fails to load. Each case starts its own server (it watches start-up or ends
the process), with the LLM off to keep start-up short."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import seed_bodies as seed
from tests.conftest import BENTOML_HOME, REPO, RedisServer, free_port, kill_all
from tests.reliability.conftest import TcpProxy

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]


SERVE = [sys.executable, "-m", "bentoml", "serve", "service:Tiffin"]


class Launched:
    def __init__(self, home: str, env: dict[str, str], log_name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(BENTOML_HOME, log_name)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                "service:Tiffin",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            env={
                **os.environ,
                "BENTOML_HOME": home,
                "TIFFIN_WORKERS": "2",
                "TIFFIN_LLM_ENABLED": "false",
                **env,
            },
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def get(self, path: str, timeout: float = 1.0) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.url}{path}", timeout=timeout)
        except httpx.HTTPError:
            return None

    def kill(self) -> None:
        kill_all(self.proc)  # the workers too: they are not in the serve process's group


SCORING = seed.SCORING_ROUTES


@pytest.fixture(scope="module")
def slow_redis(
    redis_behind_proxy: tuple[RedisServer, TcpProxy],
) -> Iterator[TcpProxy]:
    """Its own proxy to the package's seeded Redis, so delaying it slows only this module."""
    server, _ = redis_behind_proxy
    proxy = TcpProxy(server.port)
    yield proxy
    proxy.close()


def test_readiness_tells_the_truth_from_the_first_second_then_sigterm_drains(
    model_store: str, slow_redis: TcpProxy
) -> None:
    """Pass, start-up: polled every 50 ms from launch, /ready is never 200 before /livez answers,
    and the first request to every scoring route right after /ready turns 200 answers 200 in
    under 1 s (models loaded and warm).
    Pass, SIGTERM (to the `bentoml serve` process only, as an orchestrator sends it) while 6
    batch requests are in flight (each held ~1.5 s by a Redis delayed 1.5 s): all 6 complete
    with 200, and the server exits within 30 s."""
    served = Launched(
        model_store,
        {"REDIS_URL": slow_redis.url, "REDIS_TIMEOUT_MS": "5000", "REDIS_RETRY_AFTER_S": "0"},
        "serve-startup.log",
    )
    try:
        ready_at = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ready_at is None:
            assert served.proc.poll() is None, served.log.read_text()[-3000:]
            ready = served.get("/ready")
            live = served.get("/livez")
            if ready is not None and ready.status_code == 200:
                assert live is not None and live.status_code == 200
                ready_at = time.monotonic()
            elif ready is not None:
                assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
            time.sleep(0.05)
        assert ready_at is not None, "never ready"
        with httpx.Client(base_url=served.url, timeout=10) as client:
            for path, body in SCORING:
                t0 = time.monotonic()
                response = client.post(path, json=body)
                assert response.status_code == 200, (path, response.text)
                assert time.monotonic() - t0 < 1.0, path

        slow_redis.delay_s = 1.5
        results: list[int] = []
        errors: list[str] = []

        def batch() -> None:
            try:
                r = httpx.post(
                    f"{served.url}/score/batch",
                    json={"model_type": "fraud_detection", "requests": [seed.CARD_FRAUD] * 20},
                    timeout=30,
                )
                results.append(r.status_code)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=batch) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # every request is now waiting on Redis
        served.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        for t in threads:
            t.join(30)
        assert errors == [] and results == [200] * 6, (results, errors)
        served.proc.wait(30)
        assert time.monotonic() - sent < 30
    finally:
        slow_redis.delay_s = 0.0
        served.kill()


def test_a_model_that_fails_to_load_keeps_readiness_down_and_says_why(model_store: str) -> None:
    """Pass: with bid_optimization's artifact corrupted in the store (checksum mismatch), within
    45 s of launch /livez is 200 while /ready is non-200 and names bid_optimization, and no
    worker dies on it (a start-up failure in the log ends the wait)."""
    home = tempfile.mkdtemp(prefix="tiffin-broken-store-")
    shutil.copytree(Path(model_store, "models"), Path(home, "models"))
    artifact = next(Path(home, "models", "bid_optimization").glob("*/model.onnx"))
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))
    served = Launched(home, {}, "serve-broken-model.log")
    try:
        deadline = time.monotonic() + 45
        seen = None
        while time.monotonic() < deadline:
            live, ready = served.get("/livez"), served.get("/ready")
            if live is not None and live.status_code == 200 and ready is not None:
                seen = ready
                break
            log = served.log.read_text(errors="replace")
            assert "Application startup failed" not in log, "a worker died on the broken model"
            time.sleep(0.5)
        assert seen is not None, "liveness never answered 200"
        assert seen.status_code != 200 and "bid_optimization" in seen.text
    finally:
        served.kill()
        shutil.rmtree(home, ignore_errors=True)
