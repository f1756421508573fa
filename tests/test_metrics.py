"""`observe_many` records exactly what one `observe` per value would."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from tiffin.metrics import SCORE_BUCKETS, observe_many


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in histogram.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_observe_many_equals_observe_one_at_a_time() -> None:
    values = np.random.default_rng(0).uniform(0, 1, 1000)
    values[:20] = SCORE_BUCKETS[3]  # on a bucket bound: counted in that bucket (le)
    values[20:25] = [0.0, 1.0, 1.5, -0.2, 1e-9]
    one, many = (
        Histogram("h", "doc", buckets=SCORE_BUCKETS, registry=CollectorRegistry()) for _ in range(2)
    )
    for v in values:
        one.observe(float(v))
    observe_many(many, values)
    observe_many(many, np.asarray([]))
    expected, got = samples(one), samples(many)
    assert got.keys() == expected.keys()
    total = ("h_sum", "")
    assert {k: v for k, v in got.items() if k != total} == {
        k: v for k, v in expected.items() if k != total
    }
    assert abs(got[total] - expected[total]) < 1e-9
    assert got[("h_count", "")] == 1000
