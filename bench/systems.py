"""The systems under test: how each is started, when it is ready, and what it costs.

Each system runs as its own process tree on 127.0.0.1 (started in a new session so the whole tree
can be stopped), logs to `bench/results/logs/`, and is measured by summing CPU time and RSS over
every process in its tree (psutil), sampled around every load step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MLSERVER_VENV = REPO / "bench" / ".venvs" / "mlserver"
MLSERVER_PIP = ("mlserver==1.7.1", "mlserver-xgboost==1.7.1", "uvloop<0.22")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TreeSample:
    cpu_s: float
    rss_bytes: int
    processes: int


def tree(root: psutil.Process, exclude: re.Pattern[str] | None = None) -> list[psutil.Process]:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    if exclude is None:
        return procs
    kept = []
    for p in procs:
        try:
            if not exclude.search(" ".join(p.cmdline())):
                kept.append(p)
        except psutil.Error:
            pass
    return kept


def sample(procs: list[psutil.Process]) -> TreeSample:
    cpu, rss, n = 0.0, 0, 0
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
                n += 1
        except psutil.Error:
            pass
    return TreeSample(cpu, rss, n)


def describe(procs: list[psutil.Process]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            out.append({"pid": p.pid, "rss_mb": round(p.memory_info().rss / 2**20, 1), "cmd": cmd})
        except psutil.Error:
            pass
    return out


@dataclass
class System:
    """One running system: its process tree, URL and measurements."""

    name: str
    title: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    port: int
    cwd: Path = REPO
    warm: list[tuple[str, bytes]] = field(default_factory=list)
    rss_exclude: re.Pattern[str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        logs = RESULTS / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = (logs / f"{self.name}.log").open("wb")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (logs / f"{self.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited while starting:\n{tail}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} not ready after {timeout}s")
        self.started_s = time.perf_counter() - started
        for path, body in self.warm:
            r = httpx.post(
                self.url + path,
                content=body,
                headers={"content-type": "application/json"},
                timeout=30,
            )
            if r.status_code != 200:
                raise RuntimeError(f"{self.name} {path} answered {r.status_code}: {r.text[:300]}")

    def processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        return tree(psutil.Process(self.proc.pid), self.rss_exclude)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


class Redis:
    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is required (`make redis-server` installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
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
            start_new_session=True,
        )
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.1)
        subprocess.run(
            [sys.executable, "-m", "models.seed_features", "--redis-url", self.url],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def model_dir(tag: str) -> Path:
    import bentoml

    return Path(bentoml.models.get(tag).path)


# Every peer gets one native thread per worker process, as Tiffin and the reference configure their
# engines themselves (Tiffin runs exactly as deployed, without this environment). XGBoost's OpenMP
# default (a thread per core, spinning between calls) costs MLServer ~6x CPU per request on this
# box (17.5 vs 3.1 ms, measured): a handicap no operator would leave in place.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _base_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIFFIN_", "BENCH_"))}
    env["REDIS_URL"] = redis_url
    env["PYTHONPATH"] = str(REPO)
    return env


def tiffin(
    redis_url: str,
    workers: int = 2,
    rss_exclude: str = "llm",
    llm: bool = False,
    topology: str = "in-process",
    checkout: Path | None = None,
) -> System:
    """`llm` False: the tabular bundle the targets speak of ("LLM runner excluded"); the LLM runs
    inside the entry workers, so excluding it means not loading it (`TIFFIN_LLM_ENABLED=false`).
    `topology`: where the runners run (`TIFFIN_TOPOLOGY`; tiffin/topology.py). `checkout`:
    serve another revision of Tiffin (a `git worktree`) beside this one, same models and Redis:
    the A/B of a change measured side by side (`bench.run --baseline DIR`)."""
    from bench.workloads import predict_fraud_body, score_fraud_body, v1_body

    port = free_port()
    env = {
        **_base_env(redis_url),
        "TIFFIN_WORKERS": str(workers),
        "TIFFIN_LLM_ENABLED": str(llm).lower(),
        "TIFFIN_TOPOLOGY": topology,
    }
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    import random

    rng = random.Random(0)
    warm = [
        ("/score/fraud", score_fraud_body(rng)),
        ("/predict/fraud", predict_fraud_body(rng)),
        ("/v1/models/predict", v1_body(rng)),
        (
            "/predict/ctr",
            b'{"placement_id": "placement_456", "ad_format": "banner", '
            b'"user_segments": ["sports"], "time_of_day": 14, "day_of_week": 3}',
        ),
        (
            "/predict/bid",
            b'{"placement_id": "placement_789", "floor_cpm": 2.5, "predicted_ctr": 0.025, '
            b'"competition_level": "medium", "budget_remaining": 1000.0}',
        ),
        (
            "/score/personalization",
            b'{"user_id": "user_00005678", "item_id": "item_electronics_001", '
            b'"item_category": "electronics", "item_price": 299.99}',
        ),
    ]
    name = "tiffin" if topology == "in-process" else f"tiffin_{topology}"
    return System(
        "tiffin_baseline" if checkout is not None else name,
        f"Tiffin (bentoml serve, {workers} workers, runners {topology}, "
        f"LLM {'loaded' if llm else 'disabled'})",
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service:Tiffin",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
        "/ready",
        port,
        warm=warm,
        rss_exclude=re.compile(rss_exclude) if rss_exclude else None,
        cwd=checkout or REPO,
    )


def seed(redis_url: str) -> System:
    port = free_port()
    env = {
        **_base_env(redis_url),
        "BENCH_CARD_FRAUD_DIR": str(model_dir("card_fraud:v1.0")),
        "BENCH_AD_FRAUD_DIR": str(model_dir("fraud_detection:1.0.0")),
        **ONE_THREAD,
    }
    return System(
        "seed",
        "seed-style (FastAPI, pydantic, sync redis, native XGBoost, 2 workers)",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.baselines.seed_style:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        env,
        "/health",
        port,
    )


def reference(redis_url: str, contribs: str = "path") -> System:
    port = free_port()
    env = {
        **_base_env(redis_url),
        "BENCH_CARD_FRAUD_DIR": str(model_dir("card_fraud:v1.0")),
        "BENCH_REFERENCE_CONTRIBS": contribs,
        **ONE_THREAD,
    }
    return System(
        "reference",
        "hand-tuned reference (Starlette, orjson, ONNX Runtime, redis.asyncio+hiredis, 2 workers)",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.baselines.reference:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
        ],
        env,
        "/health",
        port,
    )


def ensure_mlserver_venv() -> Path:
    """bench/.venvs/mlserver: MLServer 1.7.1 and its XGBoost runtime, apart from Tiffin's deps.

    MLServer pins an older starlette, and its worker crashes with uvloop >= 0.22, hence its own
    virtualenv with `uvloop<0.22`. Created once (pip, ~1 minute); `make bench-setup` does it too.
    """
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if mlserver.exists():
        return mlserver
    subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
    pip = [str(MLSERVER_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *MLSERVER_PIP], check=True)
    return mlserver


def mlserver(redis_url: str) -> System:
    del redis_url  # the generic path uses no features
    executable = ensure_mlserver_venv()
    port, grpc, metrics = free_port(), free_port(), free_port()
    root = RESULTS / "mlserver-repo"
    model = root / "card_fraud"
    model.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": grpc,
                "metrics_port": metrics,
                "parallel_workers": 0,
            },
            indent=2,
        )
    )
    directory = model_dir("card_fraud:v1.0")
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "card_fraud",
                "implementation": "mlserver_xgboost.XGBoostModel",
                "parameters": {"uri": str(directory / "model.json"), "version": directory.name},
            },
            indent=2,
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(ONE_THREAD)
    return System(
        "mlserver",
        "Seldon MLServer 1.7.1 + mlserver-xgboost (parallel_workers=0)",
        [str(executable), "start", str(root)],
        env,
        "/v2/health/ready",
        port,
    )


FACTORIES = {"tiffin": tiffin, "seed": seed, "reference": reference, "mlserver": mlserver}
