"""What live drift counting costs on the request path, in process.

`python -m bench.drift_cost` (after `make train`): the median of one `/score/fraud` pipeline
call (embedded feature store, in-process runners) with and without the drift recorder,
interleaved so both see the same machine, and `DriftRecorder.record` alone for one row and a
256-row batch.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import numpy as np


def _median_us(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def main() -> int:
    from tiffin.app import local_app
    from tiffin.schemas import CardFraudRequest

    worker = local_app().worker
    assert worker.scoring is not None and worker.router is not None
    pipeline = worker.scoring.card_fraud
    recorder = worker.router.drift
    request = [CardFraudRequest(card_id="card_00001234", transaction_amount=150.0, mcc_code="5411")]
    loop = asyncio.new_event_loop()

    def call() -> object:
        return loop.run_until_complete(pipeline(request))

    for _ in range(500):
        call()
    with_drift, without = [], []
    for _ in range(15):
        worker.router.drift = recorder
        with_drift.append(_median_us(call, 400))
        worker.router.drift = None
        without.append(_median_us(call, 400))
    worker.router.drift = recorder
    on, off = statistics.median(with_drift), statistics.median(without)
    print(f"/score/fraud pipeline call: {on:.1f} us with drift, {off:.1f} us without")
    print(f"  difference {on - off:.1f} us ({(on - off) / off * 100:.1f}%)")

    assert recorder is not None
    ref = loop.run_until_complete(worker.router.choose("card_fraud", None)).ref
    rng = np.random.default_rng(0)
    for rows in (1, 256):
        x = rng.lognormal(1, 1, (rows, ref.n_features)).astype(np.float32)

        async def record_many(x: np.ndarray = x, n: int = 5000) -> float:
            # on the event loop, as in a request: counts go to the counters once per interval
            samples = []
            for _ in range(n):
                started = time.perf_counter()
                recorder.record(ref, x)
                samples.append((time.perf_counter() - started) * 1e6)
            return statistics.median(samples)

        cost = loop.run_until_complete(record_many())
        print(f"DriftRecorder.record, {rows} row(s) x {ref.n_features} features: {cost:.1f} us")
    loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
