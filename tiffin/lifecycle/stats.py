"""Per-version statistics read back from the Prometheus metrics every worker writes.

The same numbers `/metrics` exposes (every worker of this replica, via its multiprocess directory)
are what each replica contributes to `/v1/metrics/{version}`, canary analysis and A/B tests, so
there is one source of truth; `tiffin.lifecycle.fleet` sums the replicas. Snapshots are
cumulative; analyses subtract a baseline snapshot taken at the window's start.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY

from tiffin.drift import MISSING, SLOTS, bins_key
from tiffin.metrics import LATENCY_BUCKETS, SCORE_BUCKETS

Snapshot = dict[str, Any]
Snapshots = dict[str, dict[str, Snapshot]]
"""model -> version -> snapshot"""


def local_counts() -> Callable[[], Snapshots]:
    """A reader of this replica's counts per model and version: every worker's, from the
    multiprocess directory BentoML gives the workers, else this process's own."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        return ReplicaFiles(directory)
    return lambda: collect(REGISTRY.collect())


# Where each multiprocess sample goes in a Snapshot: (field, histogram bounds or None).
_FIELDS: dict[str, tuple[str, tuple[float, ...] | None]] = {
    "ml_inference_duration_seconds_bucket": ("latency", LATENCY_BUCKETS),
    "ml_inference_duration_seconds_sum": ("latency_sum", None),
    "prediction_scores_bucket": ("scores", SCORE_BUCKETS),
    "prediction_scores_sum": ("score_sum", None),
}


@dataclass
class ReplicaFiles:
    """The counts `collect` finds, read straight from a Prometheus multiprocess directory.

    Every replica reads its own each publish interval. `MultiProcessCollector` parses every
    sample's key as JSON and builds every metric family on each read (~20 ms for 7 models x 3
    versions on one worker's files); this parses a key once, skips the metrics lifecycle
    decisions do not use, and reads in ~1 ms.
    """

    directory: str
    # raw key -> (model, version, field, bucket index or -1); None: not a lifecycle sample
    _keys: dict[str, tuple[str, str, str, int] | None] = field(default_factory=dict)

    def __call__(self) -> Snapshots:
        from prometheus_client.mmap_dict import MmapedDict

        out: Snapshots = {}
        paths = glob.glob(os.path.join(self.directory, "counter_*.db"))
        paths += glob.glob(os.path.join(self.directory, "histogram_*.db"))
        for path in paths:
            try:
                values = MmapedDict.read_all_values_from_file(path)
            except FileNotFoundError:
                continue
            for key, value, _, _ in values:
                if key in self._keys:
                    target = self._keys[key]
                else:
                    target = self._keys[key] = _target(key)
                if target is None:
                    continue
                model, version, name, index = target
                versions = out.setdefault(model, {})
                snap = versions.get(version) or versions.setdefault(version, empty())
                if name not in snap:  # a feature's drift bins (tiffin.drift)
                    snap[name] = [0.0] * SLOTS
                if index < 0:
                    snap[name] += value
                else:
                    snap[name][index] += value
        for versions in out.values():  # the files hold per-bucket counts: cumulate them
            for snap in versions.values():
                snap["latency"] = list(itertools.accumulate(snap["latency"]))
                snap["scores"] = list(itertools.accumulate(snap["scores"]))
                snap["score_count"] = snap["scores"][-1]
        return out


def _target(key: str) -> tuple[str, str, str, int] | None:
    _, name, labels, _ = json.loads(key)
    if "model" not in labels:
        return None
    model, version = labels["model"], labels.get("version", "")
    if name == "ml_inference_requests_total":
        return model, version, "ok" if labels.get("status") == "success" else "error", -1
    if name == "ml_feature_bin_total":
        return model, version, bins_key(labels["feature"]), _bin_index(labels["bin"])
    if name not in _FIELDS:
        return None
    field_name, bounds = _FIELDS[name]
    if bounds is None:
        return model, version, field_name, -1
    le = labels["le"]
    return model, version, field_name, len(bounds) if le == "+Inf" else bounds.index(float(le))


def _bin_index(label: str) -> int:
    return MISSING if label == "missing" else int(label)


def empty() -> Snapshot:
    return {
        "ok": 0.0,
        "error": 0.0,
        "latency": [0.0] * (len(LATENCY_BUCKETS) + 1),
        "latency_sum": 0.0,
        "scores": [0.0] * (len(SCORE_BUCKETS) + 1),
        "score_sum": 0.0,
        "score_count": 0.0,
    }


def collect(
    families: Iterable[Any], model: str | None = None, versions: list[str] | None = None
) -> Snapshots:
    """Per model and version snapshots from metric families (every model when `model` is None)."""
    out: Snapshots = {}

    def slot(labels: dict[str, str]) -> Snapshot:
        versions_of = out.setdefault(labels["model"], {})
        version = labels.get("version", "")
        if version not in versions_of:
            versions_of[version] = empty()
        return versions_of[version]

    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if "model" not in labels or (model is not None and labels["model"] != model):
                continue
            if versions is not None and labels.get("version", "") not in versions:
                continue
            name = sample.name
            if name == "ml_inference_requests_total":
                slot(labels)["ok" if labels.get("status") == "success" else "error"] += sample.value
            elif name == "ml_inference_duration_seconds_bucket":
                _add_bucket(slot(labels)["latency"], LATENCY_BUCKETS, labels["le"], sample.value)
            elif name == "ml_inference_duration_seconds_sum":
                slot(labels)["latency_sum"] += sample.value
            elif name == "prediction_scores_bucket":
                _add_bucket(slot(labels)["scores"], SCORE_BUCKETS, labels["le"], sample.value)
            elif name == "prediction_scores_sum":
                slot(labels)["score_sum"] += sample.value
            elif name == "prediction_scores_count":
                slot(labels)["score_count"] += sample.value
            elif name == "ml_feature_bin_total":
                bins = slot(labels).setdefault(bins_key(labels["feature"]), [0.0] * SLOTS)
                bins[_bin_index(labels["bin"])] += sample.value
    return out


def combine(a: Snapshot, b: Snapshot, sign: float = 1.0) -> Snapshot:
    """a + sign * b, field by field; a field on one side only (a feature's drift bins, which
    exist once that feature was seen) counts as zeros on the other."""
    out: Snapshot = {}
    for key in a.keys() | b.keys():
        other = b.get(key)
        value = a.get(key)
        if value is None:
            value = [0.0] * len(other) if isinstance(other, list) else 0.0
        if isinstance(value, list):
            other = other or [0.0] * len(value)
            out[key] = [x + sign * y for x, y in zip(value, other, strict=True)]
        else:
            out[key] = value + sign * (other or 0.0)
    return out


def combine_all(a: Snapshots, b: Snapshots, sign: float = 1.0) -> Snapshots:
    """`combine` for every model and version of either side."""
    out: Snapshots = {model: dict(versions) for model, versions in a.items()}
    for model, versions in b.items():
        mine = out.setdefault(model, {})
        for version, snap in versions.items():
            mine[version] = combine(mine.get(version) or empty(), snap, sign)
    return out


def _add_bucket(target: list[float], bounds: tuple[float, ...], le: str, value: float) -> None:
    index = len(bounds) if le == "+Inf" else bounds.index(float(le))
    target[index] += value  # cumulative counts, as Prometheus exposes them


def delta(now: Snapshot, base: Snapshot | None) -> Snapshot:
    """What happened since `base`. Never negative: a baseline and a later snapshot may be read on
    different replicas, each seeing its own counts fresh and the others' up to one publish late."""
    if not base:
        return now
    out: Snapshot = {}
    for key, value in combine(now, base, -1.0).items():
        out[key] = [max(v, 0.0) for v in value] if isinstance(value, list) else max(value, 0.0)
    return out


def _quantile(cumulative: list[float], bounds: tuple[float, ...], q: float) -> float | None:
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    for bound, count in zip(bounds, cumulative, strict=False):
        if count >= q * total:
            return bound
    return math.inf


def _densities(cumulative: list[float]) -> list[float]:
    return [max(c - p, 0.0) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]


def summary(snap: Snapshot) -> dict[str, Any]:
    requests = snap["ok"] + snap["error"]
    latency = snap["latency"]
    p = {f"p{int(q * 100)}": _quantile(latency, LATENCY_BUCKETS, q) for q in (0.5, 0.95, 0.99)}
    scores = _densities(snap["scores"])
    score_total = sum(scores)
    return {
        "requests": int(requests),
        "errors": int(snap["error"]),
        "success_rate": round(snap["ok"] / requests, 6) if requests else None,
        "error_rate": round(snap["error"] / requests, 6) if requests else None,
        "latency_ms": {k: (None if v is None else round(v * 1000, 3)) for k, v in p.items()},
        "mean_latency_ms": round(snap["latency_sum"] / latency[-1] * 1000, 3)
        if latency[-1]
        else None,
        "prediction_mean": round(snap["score_sum"] / snap["score_count"], 6)
        if snap["score_count"]
        else None,
        "prediction_distribution": {
            f"<={b}": int(c) for b, c in zip((*SCORE_BUCKETS, "+Inf"), scores, strict=True) if c
        }
        if score_total
        else {},
    }


def p99_ms(snap: Snapshot) -> float | None:
    value = _quantile(snap["latency"], LATENCY_BUCKETS, 0.99)
    return None if value is None else value * 1000


def psi(a: Snapshot, b: Snapshot) -> float | None:
    """Population stability index between two score distributions (None without scores)."""
    da, db = _densities(a["scores"]), _densities(b["scores"])
    ta, tb = sum(da), sum(db)
    if ta <= 0 or tb <= 0:
        return None
    eps = 1e-4
    return float(
        sum(
            ((x / ta) - (y / tb)) * math.log(((x / ta) + eps) / ((y / tb) + eps))
            for x, y in zip(da, db, strict=True)
        )
    )


def score_moments(snap: Snapshot) -> tuple[float, float, float] | None:
    """(count, mean, variance) of scores, variance from bucket midpoints."""
    counts = _densities(snap["scores"])
    n = sum(counts)
    if n <= 1:
        return None
    mean = snap["score_sum"] / snap["score_count"] if snap["score_count"] else 0.0
    mids = [b - 0.025 for b in SCORE_BUCKETS] + [SCORE_BUCKETS[-1]]
    var = sum(c * (m - mean) ** 2 for c, m in zip(counts, mids, strict=True)) / (n - 1)
    return n, mean, max(var, 1e-12)
