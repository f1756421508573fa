"""CPU per `/score/fraud` call inside one worker, without a server: the pipeline alone, the
Tiffin application (decode, score, encode), and the application behind the body limits and
request-id middlewares. CPU time (`time.process_time`), so the figures hold on a busy box.

    BENTOML_HOME=... TIFFIN_LLM_ENABLED=false python -m bench.app_cost [--calls 1500 --rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

BODY = orjson.dumps(
    {
        "card_id": "card_00001234",
        "transaction_amount": 150.0,
        "merchant_id": "merchant_12345",
        "mcc_code": "5411",
        "country_code": "US",
    }
)


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": BODY, "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


def _scope() -> dict[str, Any]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    return {
        "type": "http",
        "method": "POST",
        "path": "/score/fraud",
        "headers": headers,
        "query_string": b"",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 3000),
    }


async def _cpu_us(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def measure(calls: int, rounds: int) -> dict[str, float]:
    from tiffin.app import local_app
    from tiffin.limits import LimitsMiddleware
    from tiffin.logs import RequestIdMiddleware
    from tiffin.schemas import CardFraudRequest

    app = local_app()
    assert app.worker.scoring is not None
    scoring = app.worker.scoring
    request = CardFraudRequest.model_validate(orjson.loads(BODY))
    stack = RequestIdMiddleware(LimitsMiddleware(app))
    paths: dict[str, Callable[[], Awaitable[Any]]] = {
        "pipeline": lambda: scoring.score_fraud(request),
        "app": lambda: app(_scope(), _receive, _send),
        "limits+request-id+app": lambda: stack(_scope(), _receive, _send),
    }
    for call in paths.values():  # warm up
        await _cpu_us(call, calls // 5)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):  # interleaved, so drift in the box's load hits every path alike
        for name, call in paths.items():
            samples[name].append(await _cpu_us(call, calls))
    app.worker.close()
    return {name: round(statistics.median(v), 1) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name, micros in asyncio.run(measure(args.calls, args.rounds)).items():
        print(f"{name:>24}: {micros:7.1f} us CPU per call (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
