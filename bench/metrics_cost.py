"""What the seeds' extra metric names cost: per request (the in-flight gauge) and per scrape.

`python -m bench.metrics_cost` (after `make train`), in a Prometheus multiprocess directory of its
own, as a `bentoml serve` worker runs:

- `LimitsMiddleware` around an empty application, per request: as it is (in-flight count written
  into the worker's multiprocess slot), with the write replaced by nothing, and with a
  `Gauge.inc()`/`dec()` pair instead; interleaved rounds, medians and minima.
- `exposition()` after every scoring route has answered requests (in-process runners, embedded
  feature store): with the derived seed names, and the same families without them.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests import seed_bodies as seed

ROUTES = seed.SCORING_ROUTES


async def _empty(scope: Any, receive: Any, send: Any) -> None:
    await receive()


async def _per_request_us(app: Callable[..., Awaitable[None]], n: int) -> float:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/score/fraud",
        "headers": [(b"content-length", b"2")],
        "client": ("10.0.0.1", 1),
    }
    message = {"type": "http.request", "body": b"{}", "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(_: Any) -> None:
        return None

    started = time.perf_counter()
    for _ in range(n):
        await app(scope, receive, send)
    return (time.perf_counter() - started) / n * 1e6


def middleware() -> None:
    from tiffin.limits import LimitsMiddleware
    from tiffin.metrics import active_requests

    gauge = active_requests()

    async def inc_dec(scope: Any, receive: Any, send: Any) -> None:
        gauge.inc()
        try:
            await _empty(scope, receive, send)
        finally:
            gauge.dec()

    slot = LimitsMiddleware(_empty)
    nothing = LimitsMiddleware(_empty)
    nothing._publish_active = lambda _: None
    with_gauge = LimitsMiddleware(inc_dec)
    with_gauge._publish_active = lambda _: None
    variants = {"slot write (Tiffin)": slot, "no gauge": nothing, "Gauge.inc/dec": with_gauge}
    rounds: dict[str, list[float]] = {name: [] for name in variants}

    async def run() -> None:
        for app in variants.values():
            await _per_request_us(app, 2000)
        for _ in range(9):
            for name, app in variants.items():
                rounds[name].append(await _per_request_us(app, 20_000))

    asyncio.run(run())
    for name, times in rounds.items():
        print(
            f"LimitsMiddleware, {name:20s} median {statistics.median(times):.2f} us, "
            f"min {min(times):.2f} us a request"
        )


def scrape() -> None:
    import httpx
    from prometheus_client import generate_latest

    from tiffin.app import local_app
    from tiffin.metrics import _Collected, collected, exposition, seed_aliases

    app = local_app()

    async def score() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for _ in range(16):
                for path, body in ROUTES:
                    response = await client.post(path, json=body)
                    assert response.status_code == 200, (path, response.text)

    asyncio.run(score())
    with_aliases: list[float] = []
    without: list[float] = []
    aliases_only: list[float] = []
    for _ in range(15):
        for out, call in (
            (with_aliases, exposition),
            (without, lambda: generate_latest(_Collected(collected()))),
        ):
            started = time.perf_counter()
            for _ in range(20):
                call()
            out.append((time.perf_counter() - started) / 20 * 1e3)
        families = collected()
        started = time.perf_counter()
        seed_aliases(families)
        aliases_only.append((time.perf_counter() - started) * 1e3)
    text = exposition()[0]
    plain = generate_latest(_Collected(collected()))
    print(
        f"exposition(): {statistics.median(with_aliases):.2f} ms with the seed names "
        f"({len(text) / 1024:.0f} KiB), {statistics.median(without):.2f} ms without "
        f"({len(plain) / 1024:.0f} KiB); seed_aliases alone "
        f"{statistics.median(aliases_only):.2f} ms"
    )


def main() -> int:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="tiffin-bench-"))
    middleware()
    scrape()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
