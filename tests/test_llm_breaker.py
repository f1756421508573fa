"""Backend failures: timeouts, bounded retries and the circuit breaker — a 503 with the breaker
state, fast, and never a hang.

"Down" is a real closed loopback port (connection refused); "slow" is a real loopback server that
accepts connections and never answers. The breaker's own state machine is driven by an explicit
clock so its timing is exact.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tiffin.llm.breaker import CircuitBreaker
from tiffin.llm.engine import Prompt
from tiffin.llm.errors import LLMBusy, LLMUnavailable, to_response
from tiffin.llm.explain import explain_fraud
from tiffin.llm.runtime import LLM
from tiffin.llm.settings import LLMSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_half_opens_after_timeout_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker("b", failure_threshold=3, reset_timeout_s=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure("refused")
    assert breaker.state == "closed"
    assert breaker.allow()
    breaker.record_failure("refused")
    assert breaker.state == "open"
    assert not breaker.allow()
    clock.now += 4
    assert breaker.status()["retry_after_s"] == pytest.approx(6)
    clock.now += 6
    assert breaker.state == "half_open"
    assert breaker.allow()  # the one trial call
    assert not breaker.allow()  # nobody else while it runs
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.status()["consecutive_failures"] == 0


def test_failed_trial_reopens_and_reset_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker("b", failure_threshold=1, reset_timeout_s=5, clock=clock)
    breaker.record_failure("boom")
    clock.now += 5
    assert breaker.allow()
    breaker.record_failure("still boom")
    assert breaker.state == "open"
    assert breaker.status()["last_error"] == "still boom"
    breaker.reset()
    assert breaker.state == "closed"
    assert breaker.status()["last_error"] is None


def test_success_in_between_resets_the_count() -> None:
    breaker = CircuitBreaker("b", failure_threshold=2, reset_timeout_s=5, clock=Clock())
    breaker.record_failure("x")
    breaker.record_success()
    breaker.record_failure("x")
    assert breaker.state == "closed"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never answers (a hung backend)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def remote_llm(port: int, **overrides: object) -> LLM:
    values: dict[str, object] = {
        "engine": "remote",
        "remote_base_url": f"http://127.0.0.1:{port}/v1",
        "remote_max_retries": 1,
        "remote_connect_timeout_s": 1.0,
        "remote_timeout_s": 1.0,
        "breaker_failure_threshold": 2,
        "breaker_reset_timeout_s": 30,
        **overrides,
    }
    settings = LLMSettings(**values)  # type: ignore[arg-type]
    llm = LLM.from_settings(settings)
    assert llm.engine is not None and llm.engine.kind == "remote"
    return llm


PROMPT = Prompt(text="Is this transaction fraud?")


def test_backend_down_answers_unavailable_fast_then_breaker_opens() -> None:
    llm = remote_llm(closed_port())

    async def scenario() -> list[tuple[float, LLMUnavailable]]:
        out = []
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(LLMUnavailable) as info:
                await llm.generate(PROMPT, llm.params(16))
            out.append((time.monotonic() - started, info.value))
        return out

    (t1, e1), (t2, e2), (t3, e3) = asyncio.run(scenario())
    assert t1 < 5 and t2 < 5, "one retry with backoff, never a hang"
    assert "cannot reach the LLM backend" in e1.message
    assert e1.detail["breaker"]["state"] == "closed"
    assert e2.detail["breaker"]["state"] == "open"
    assert "circuit breaker is open" in e3.message
    assert t3 < 0.05, "an open breaker fails without touching the backend"
    assert e3.detail["breaker"]["consecutive_failures"] == 2
    assert 0 < e3.detail["retry_after_s"] <= 30

    response = to_response(e3)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert b'"state":"open"' in response.body

    health = asyncio.run(llm.health())
    assert health["status"] == "down"
    assert "circuit breaker open" in health["reason"]
    assert llm.reset_breaker()["state"] == "closed"


def test_structured_call_to_a_down_backend_is_unavailable_not_invalid_output() -> None:
    llm = remote_llm(closed_port())
    target = llm.target(response_model="sentiment")
    with pytest.raises(LLMUnavailable, match="cannot reach the LLM backend"):
        asyncio.run(llm.structured(PROMPT, llm.params(64, structured=True), target))
    assert llm.breaker.status()["consecutive_failures"] == 1


def test_hung_backend_times_out_within_the_configured_deadline(silent_server: int) -> None:
    llm = remote_llm(silent_server, remote_max_retries=0)
    started = time.monotonic()
    with pytest.raises(LLMUnavailable, match="timed out"):
        asyncio.run(llm.generate(PROMPT, llm.params(16)))
    assert time.monotonic() - started < 4


def test_health_probe_reports_an_unreachable_backend_before_any_request() -> None:
    health = asyncio.run(remote_llm(closed_port()).health())
    assert health["status"] == "down"
    assert health["reason"].startswith("unreachable")
    assert health["backend"].endswith("/v1")


def test_fraud_explanation_falls_back_within_its_deadline(silent_server: int) -> None:
    llm = remote_llm(silent_server, remote_timeout_s=30)
    started = time.monotonic()
    out = asyncio.run(explain_fraud({"fraud_score": 0.9}, llm, timeout_ms=300))
    assert out is None
    assert time.monotonic() - started < 1.5


def test_fraud_explanation_skips_an_open_breaker_and_a_disabled_llm() -> None:
    llm = remote_llm(closed_port())
    for _ in range(2):
        llm.breaker.record_failure("refused")
    started = time.monotonic()
    assert asyncio.run(explain_fraud({"fraud_score": 0.9}, llm)) is None
    assert time.monotonic() - started < 0.05
    disabled = LLM.from_settings(LLMSettings(enabled=False))
    assert asyncio.run(explain_fraud({"fraud_score": 0.9}, disabled)) is None


def test_disabled_and_misconfigured_llms_say_why() -> None:
    disabled = LLM.from_settings(LLMSettings(enabled=False))
    with pytest.raises(LLMUnavailable, match="the LLM is disabled: disabled by TIFFIN_LLM_ENABLED"):
        asyncio.run(disabled.generate(PROMPT, disabled.params(8)))
    assert asyncio.run(disabled.health())["status"] == "disabled"
    no_backend = LLM.from_settings(LLMSettings(mlx_enabled=False))
    assert asyncio.run(no_backend.health()) == {
        "status": "disabled",
        "reason": "MLX_ENABLED=false and no TIFFIN_LLM_REMOTE_BASE_URL / OLLAMA_BASE_URL",
        "engine": "disabled",
        "model": "tiffin-tiny-llm",
    }
    missing = LLM.from_settings(LLMSettings(model_name="no-such-llm"))
    health = asyncio.run(missing.health())
    assert health["status"] == "down"
    assert "'no-such-llm:latest' is not in the BentoML model store" in health["reason"]


def test_seed_002_environment_names_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_ENABLED", "false")
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("MODEL_NAME", "llama3.2")
    monkeypatch.setenv("MODEL_PATH", "/models/default")
    settings = LLMSettings()
    assert settings.resolved_engine() == "remote"
    assert settings.remote_base_url == "http://127.0.0.1:11434/v1"
    assert settings.model_name == "llama3.2"
    assert settings.model_path == "/models/default"


def test_busy_queue_is_a_503_with_retry_after() -> None:
    response = to_response(LLMBusy("the LLM queue is full", {"retry_after_s": 1.0}))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
