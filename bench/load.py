"""Closed-loop load test: N concurrent clients hammer one endpoint for a fixed time.

`python -m bench.load [--url URL] [--path /score/fraud] [--concurrency 64] [--duration 30]`

Without `--url` it starts its own stack on loopback: a redis-server seeded by
`models.seed_features` and `bentoml serve service:Tiffin` (two workers), and stops both after.
Reports throughput, p50/p90/p99/max latency and every non-2xx response. The load is bounded in
time and only ever sent to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body_for(path: str, rng: random.Random) -> dict[str, Any]:
    if path == "/score/fraud":
        return {
            "card_id": f"card_{rng.randrange(10_000):08d}",
            "transaction_amount": round(rng.lognormvariate(4, 1), 2),
            "merchant_id": f"merchant_{rng.randrange(20_000):05d}",
            "mcc_code": rng.choice(["5411", "5812", "5816", "7995"]),
            "country_code": rng.choice(["US", "GB", "NG"]),
        }
    if path == "/predict/fraud":
        return {
            "user_id": "u",
            "ip_address": "52.1.2.3",
            "user_agent": "curl/8",
            "impressions_24h": rng.randrange(10_000),
            "clicks_24h": rng.randrange(100),
        }
    if path == "/v1/models/predict":
        return {"instances": [[rng.uniform(4, 8), 3.0, rng.uniform(1, 6), 1.0]]}
    raise SystemExit(f"no body generator for {path}")


async def run_load(url: str, path: str, concurrency: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.perf_counter() + duration

    async def client(seed: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with session.post(url + path, json=body_for(path, rng)) as resp:
                    await resp.read()
                    key = str(resp.status)
            except aiohttp.ClientError as exc:
                key = type(exc).__name__
            latencies.append(time.perf_counter() - started)
            statuses[key] = statuses.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    return {
        "path": path,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "non_2xx": len(latencies) - ok,
        "statuses": statuses,
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p90_ms": round(float(np.percentile(lat, 90)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
    }


def start_stack(stack: ExitStack, workers: int) -> str:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is required (make test installs it)")
    redis_port, port = _free_port(), _free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    stack.callback(redis.terminate)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    time.sleep(0.5)
    subprocess.run([sys.executable, "-m", "models.train"], cwd=REPO, check=True)
    subprocess.run(
        [sys.executable, "-m", "models.seed_features", "--redis-url", redis_url],
        cwd=REPO,
        check=True,
    )
    env = {**os.environ, "REDIS_URL": redis_url, "TIFFIN_WORKERS": str(workers)}
    server = subprocess.Popen(
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
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(lambda: os.killpg(server.pid, signal.SIGTERM))
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running Tiffin; default: start one")
    parser.add_argument("--path", action="append", help="endpoint(s) to load (repeatable)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    paths = args.path or ["/score/fraud"]
    with ExitStack() as stack:
        url = args.url or start_stack(stack, args.workers)
        asyncio.run(run_load(url, paths[0], 8, 3))  # warm-up, not reported
        results = [asyncio.run(run_load(url, p, args.concurrency, args.duration)) for p in paths]
    print(
        f"{'endpoint':<22}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'non-2xx':>9}"
    )
    for r in results:
        print(
            f"{r['path']:<22}{r['concurrency']:>5}{r['throughput_rps']:>9}{r['p50_ms']:>9}"
            f"{r['p90_ms']:>9}{r['p99_ms']:>9}{r['max_ms']:>9}{r['non_2xx']:>9}"
        )
    print(json.dumps(results))
    return 1 if any(r["non_2xx"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
