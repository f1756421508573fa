"""Shared fixtures: a private BentoML model store with really trained models, real redis-server
instances, and a real `bentoml serve` process. Nothing here is mocked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Must be set before anything imports bentoml: the store location is read once.
BENTOML_HOME = tempfile.mkdtemp(prefix="tiffin-test-bentoml-")
os.environ["BENTOML_HOME"] = BENTOML_HOME
os.environ.setdefault("TIFFIN_TRAIN_ROWS", "6000")
REPO = Path(__file__).resolve().parent.parent
TRAIN_ROWS = os.environ["TIFFIN_TRAIN_ROWS"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class RedisServer:
    """A throwaway redis-server on a free loopback port."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._pings, 10, "redis-server")
        return self

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def model_store() -> str:
    """Every default model, trained for real on generated data (smaller sets keep CI fast), and
    the tiny Llama the LLM runner serves, built by the project's own command."""
    from models import tiny_llm, train

    assert train.main(["--rows", TRAIN_ROWS]) == 0
    tiny_llm.ensure()
    return BENTOML_HOME


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


class Served:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log


def serve(env_overrides: dict[str, str], log_name: str, target: str = "service:Tiffin") -> Served:
    port = free_port()
    log = Path(BENTOML_HOME, log_name)
    env = {**os.environ, "BENTOML_HOME": BENTOML_HOME, "TIFFIN_WORKERS": "2", **env_overrides}
    env.pop("TIFFIN_REPLICA", None)  # set in this process by tests that import the service
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        import httpx

        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 180, f"bentoml serve {target}")
    return Served(url, proc, log)


def stop(served: Served) -> None:
    if served.proc.poll() is not None:
        return
    try:
        os.killpg(served.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        served.proc.wait(20)
    except subprocess.TimeoutExpired:
        kill_all(served.proc)


def kill_all(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a `bentoml serve` and every process it started, at once, as a dying container
    does, and wait until they are gone. circus starts each worker in a session of its own
    (docs/upstream.md §9): a SIGKILL to the serve process's group alone leaves the workers
    running, orphaned, on the inherited socket."""
    import psutil

    if proc.poll() is not None:
        return
    pids = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)

    def gone() -> bool:
        for pid in pids[1:]:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_for(gone, 10, "every process of the killed server gone")


def seeded(server: RedisServer, entities: int = 6000) -> RedisServer:
    """The generated feature snapshot written to `server` by the project's seeding command."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "models.seed_features",
            "--redis-url",
            server.url,
            "--entities",
            str(entities),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return server


@pytest.fixture(scope="module")
def seeded_redis(model_store: str) -> Iterator[RedisServer]:
    """A Redis holding the generated feature snapshot."""
    server = seeded(RedisServer().start())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiffin(model_store: str, seeded_redis: RedisServer) -> Iterator[Served]:
    """`bentoml serve service:Tiffin` with two workers, backed by the seeded Redis."""
    served = serve({"REDIS_URL": seeded_redis.url}, "serve-redis.log")
    yield served
    stop(served)


RUNNER_TARGETS = {
    "card_fraud": "runners.card_fraud:CardFraudRunner",
    "personalization": "runners.personalization:PersonalizationRunner",
    "fraud_detection": "runners.ad_fraud:AdFraudRunner",
    "ctr_prediction": "runners.ctr:CtrRunner",
    "bid_optimization": "runners.bid:BidRunner",
    "generic": "runners.generic:GenericRunner",
    "llm": "runners.llm:LLMRunner",
}


class Stack:
    """A Tiffin entry service in one runner topology, with the runners it needs."""

    def __init__(self, topology: str, redis: RedisServer) -> None:
        self.topology = topology
        self.redis = redis
        self.runners: dict[str, Served] = {}
        env = {"REDIS_URL": redis.url, "TIFFIN_TOPOLOGY": topology}
        if topology == "remote":
            for name, target in RUNNER_TARGETS.items():
                self.runners[name] = serve({}, f"runner-{name}.log", target)
            urls = {name: served.url for name, served in self.runners.items()}
            env["TIFFIN_RUNNER_URLS"] = json.dumps(urls)
        self.entry = serve(env, f"serve-{topology}.log")

    def stop(self) -> None:
        for served in (self.entry, *self.runners.values()):
            stop(served)


TOPOLOGIES = ("in-process", "separate", "remote")


@pytest.fixture(scope="module", params=TOPOLOGIES)
def stack(request: pytest.FixtureRequest, model_store: str) -> Iterator[Stack]:
    """The end-to-end contract's subject, once per runner topology, each with its own seeded
    Redis (some tests stop it)."""
    redis = seeded(RedisServer().start())
    built = Stack(request.param, redis)
    yield built
    built.stop()
    redis.stop()


@pytest.fixture(scope="module", autouse=True)
def model_store_restored(model_store: str) -> Iterator[None]:
    """Versions a module registers (through the admin API, the CLI, the importer) leave the
    shared store when the module ends: later modules see the store the session trained, so a
    test's answer never depends on which modules ran before it."""
    import bentoml

    def versions() -> set[str]:
        root = Path(BENTOML_HOME, "models")
        return {
            f"{name.name}:{version.name}"
            for name in (root.iterdir() if root.is_dir() else ())
            if name.is_dir()
            for version in name.iterdir()
            if version.is_dir()
        }

    before = versions()
    yield
    for tag in sorted(versions() - before):
        # already gone, or a store another process is writing: leave it
        with contextlib.suppress(Exception):
            bentoml.models.delete(tag)


class UvicornServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of the test process."""

    def __init__(self, app: Any, **options: Any) -> None:
        """`options`: more `uvicorn.Config` arguments (`http=` a protocol class, say)."""
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", **options
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> UvicornServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> UvicornServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
