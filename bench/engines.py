"""Serving-engine choice, measured: one-row latency of ONNX Runtime vs the native library.

`python -m bench.engines` (uses the models in the BentoML store; `make train` first).
Prints the median of 2,000 single-row calls per engine, interleaved so both see the same noise.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tiffin import model_store
from tiffin.runtimes import load_artifacts


def median_us(fn, x: np.ndarray, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def main() -> int:
    print(f"{'model':<32}{'onnx us':>10}{'native us':>11}{'ratio':>8}{'contrib us':>12}")
    for stored in model_store.tiffin_models():
        card = model_store.card_of(stored)
        model = load_artifacts(stored.tag.name, stored.tag.version or "", Path(stored.path), card)
        x = np.random.default_rng(0).normal(size=(1, model.n_features)).astype(np.float32)
        onnx, native, contrib = [], [], []
        for _ in range(10):  # interleave engines in 10 slices
            onnx.append(median_us(model.predictor.predict, x, 200))
            if model.explainer is not None:
                native.append(median_us(model.explainer.predict, x, 200))  # type: ignore[attr-defined]
                contrib.append(median_us(model.explainer.contributions, x, 20))
        o = statistics.median(onnx)
        n = statistics.median(native) if native else float("nan")
        c = statistics.median(contrib) if contrib else float("nan")
        print(f"{stored.tag!s:<32}{o:>10.1f}{n:>11.1f}{n / o:>8.1f}{c:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
