"""A/B test statistics from two arms' metric snapshots (see `tiffin.lifecycle.stats`).

- error rate: two-proportion z-test, 95% CI of the difference (B - A);
- mean prediction score: Welch's t-test, variance from the score histogram;
- response time: Welch's t-test on mean latency, variance from the latency histogram.
A comparison with fewer than `MIN_SAMPLES` requests in either arm says so instead of concluding.
"""

from __future__ import annotations

import math
from typing import Any

from scipy import stats

from tiffin.lifecycle import stats as vm
from tiffin.metrics import LATENCY_BUCKETS

MIN_SAMPLES = 100
ALPHA = 0.05
SUPPORTED = ("error_rate", "response_time", "mean_score")
ALIASES = {"latency": "response_time", "errors": "error_rate", "score": "mean_score"}


def _two_proportions(err_a: float, n_a: float, err_b: float, n_b: float) -> dict[str, Any]:
    pa, pb = err_a / n_a, err_b / n_b
    pooled = (err_a + err_b) / (n_a + n_b)
    se_pooled = math.sqrt(max(pooled * (1 - pooled) * (1 / n_a + 1 / n_b), 1e-18))
    z = (pb - pa) / se_pooled
    se = math.sqrt(max(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b, 1e-18))
    return {
        "a": round(pa, 6),
        "b": round(pb, 6),
        "difference": round(pb - pa, 6),
        "ci95": [round(pb - pa - 1.96 * se, 6), round(pb - pa + 1.96 * se, 6)],
        "p_value": float(2 * stats.norm.sf(abs(z))),
    }


def _welch(a: tuple[float, float, float], b: tuple[float, float, float]) -> dict[str, Any]:
    (na, ma, va), (nb, mb, vb) = a, b
    se = math.sqrt(va / na + vb / nb)
    t = (mb - ma) / se if se > 0 else 0.0
    dof = se**4 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if se > 0 else 1.0
    half = float(stats.t.ppf(0.975, dof)) * se
    return {
        "a": round(ma, 6),
        "b": round(mb, 6),
        "difference": round(mb - ma, 6),
        "ci95": [round(mb - ma - half, 6), round(mb - ma + half, 6)],
        "p_value": float(2 * stats.t.sf(abs(t), dof)),
    }


def _latency_moments(snap: vm.Snapshot) -> tuple[float, float, float] | None:
    cumulative = snap["latency"]
    n = cumulative[-1]
    if n <= 1:
        return None
    mean = snap["latency_sum"] / n
    lows = (0.0, *LATENCY_BUCKETS)
    mids = [(lo + hi) / 2 for lo, hi in zip(lows, LATENCY_BUCKETS, strict=False)] + [
        LATENCY_BUCKETS[-1]
    ]
    counts = [max(c - p, 0.0) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
    var = sum(c * (m - mean) ** 2 for c, m in zip(counts, mids, strict=True)) / (n - 1)
    return n, mean * 1000, max(var, 1e-12) * 1e6


def compare(arm_a: vm.Snapshot, arm_b: vm.Snapshot, metrics: list[str]) -> dict[str, Any]:
    n_a, n_b = arm_a["ok"] + arm_a["error"], arm_b["ok"] + arm_b["error"]
    result: dict[str, Any] = {
        "arms": {"a": vm.summary(arm_a), "b": vm.summary(arm_b)},
        "min_samples_per_arm": MIN_SAMPLES,
        "metrics": {},
    }
    if min(n_a, n_b) < MIN_SAMPLES:
        result["conclusion"] = "insufficient_data"
        result["detail"] = f"need {MIN_SAMPLES} requests per arm, have a={int(n_a)}, b={int(n_b)}"
        return result
    wanted = [ALIASES.get(m, m) for m in metrics] or list(SUPPORTED)
    significant = []
    for name in dict.fromkeys(wanted):
        if name == "error_rate":
            outcome = _two_proportions(arm_a["error"], n_a, arm_b["error"], n_b)
        elif name == "response_time":
            ma, mb = _latency_moments(arm_a), _latency_moments(arm_b)
            outcome = _welch(ma, mb) if ma and mb else {"unavailable": "no latency samples"}
        elif name == "mean_score":
            ma, mb = vm.score_moments(arm_a), vm.score_moments(arm_b)
            outcome = _welch(ma, mb) if ma and mb else {"unavailable": "model reports no scores"}
        else:
            outcome = {
                "unavailable": f"{name!r} needs ground-truth outcomes; supported: "
                f"{', '.join(SUPPORTED)}"
            }
        if "p_value" in outcome:
            outcome["significant"] = outcome["p_value"] < ALPHA
            if outcome["significant"]:
                significant.append(name)
        result["metrics"][name] = outcome
    result["conclusion"] = "significant_difference" if significant else "no_significant_difference"
    result["significant_metrics"] = significant
    return result
