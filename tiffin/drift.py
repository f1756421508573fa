"""Feature and score drift: reference distributions saved with a version, live PSI against them.

Reference (`Reference`, stored in the version's `ModelCard.reference`): per feature, up to
`MAX_BINS` quantile bins of the training (or import probe) rows, plus a slot for missing values;
the score's distribution in `prediction_scores`' buckets (`tiffin.metrics.SCORE_BUCKETS`).

Live: the router hands every answered batch to `DriftRecorder.record`, which finds each value's
reference bin for all features at once (one broadcast comparison against a padded edge matrix)
and adds the batch's counts to `ml_feature_bin_total{model,version,feature,bin}`, at most
features x (MAX_BINS + 1) series per version. Those counters go through the same per-replica
publish / fleet sum as the other lifecycle statistics (`tiffin.lifecycle.stats`), so
`GET /drift/{model}` answers the same PSI on every replica. Scores need nothing new: they are
`prediction_scores` already.
"""

from __future__ import annotations

import asyncio
import math
import random
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tiffin.metrics import SCORE_BUCKETS

MAX_BINS = 10
SLOTS = MAX_BINS + 1
"""Bins per feature in a snapshot: up to MAX_BINS value bins, then the missing-value slot."""
MISSING = MAX_BINS
PYTHON_ROWS = 4
"""Up to this many rows a batch is binned in Python (a bisect per value); larger ones by one
`np.searchsorted` per feature."""
SCORE_FEATURE = "__score__"
"""The `feature` label of the score's PSI on `ml_feature_drift_psi`."""
EPS = 1e-4
"""Floor of a bin's share in PSI, so an empty bin on one side is a large term, not infinity."""


class DriftSettings(BaseSettings):
    """Live drift measurement and judgement."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_DRIFT_", extra="ignore")

    enabled: bool = True
    """Count each request's feature values in their reference bins. Off: `/drift` reports no
    live samples (scores are still counted by `prediction_scores`)."""

    sample_rate: float = Field(1.0, gt=0, le=1)
    """Fraction of requests whose features are counted. PSI compares shares, so a uniform sample
    gives the same answer on fewer counter updates; lower it if the per-request cost shows
    (~3-5 us for a 16-feature row, measured in docs/benchmarks.md)."""

    threshold: float = Field(0.2, gt=0)
    """PSI above which a feature (or the score) is reported `drifted`: 0.1-0.2 is the usual
    "moderate shift" band, above 0.2 a significant one."""

    flush_interval_s: float = Field(0.2, ge=0, le=10)
    """Counts are added to the Prometheus counters at most this long after the request (one
    pass for every request in between, instead of one increment per feature and request), so
    `/drift` and `/metrics` see a request this much later. 0: at the next loop iteration."""

    min_samples: int = Field(100, ge=1)
    """Live samples a feature needs before it can be flagged: PSI over a handful of rows is
    noise."""


class FeatureReference(BaseModel):
    """One feature's reference: interior bin edges (value bins are `len(edges) + 1`) and the
    reference rows' count per bin, the missing-value count last."""

    edges: list[float]
    counts: list[float]


class Reference(BaseModel):
    """What a version saw at training (or import): stored in its `ModelCard`."""

    rows: int
    features: dict[str, FeatureReference]
    score: list[float] | None = None
    """Counts per `prediction_scores` bucket (SCORE_BUCKETS then +Inf); None: no score is
    recorded for this task (regression)."""


def build_reference(
    rows: np.ndarray, feature_names: Sequence[str], scores: np.ndarray | None
) -> Reference:
    """Reference distributions of `rows` (n, features) and of the recorded `scores`."""
    rows = np.asarray(rows, dtype=np.float64)
    quantiles = np.linspace(0, 1, MAX_BINS + 1)[1:-1]
    features: dict[str, FeatureReference] = {}
    for j, name in enumerate(feature_names):
        column = rows[:, j]
        present = column[~np.isnan(column)]
        # Edges rounded to float32 first: live rows are float32 and are binned against float32
        # edges, so a value on an edge lands in the same bin here and live. Discrete features
        # repeat quantiles: unique edges give them fewer bins.
        edges = (
            np.unique(np.quantile(present, quantiles).astype(np.float32)).astype(np.float64)
            if present.size
            else np.array([])
        )
        # an edge at the minimum would leave the bin below it empty by construction
        edges = edges[edges > present.min()] if present.size else edges
        counts = np.zeros(SLOTS)
        bins = np.searchsorted(edges, present, side="right")
        counts[: edges.size + 1] = np.bincount(bins, minlength=edges.size + 1)
        counts[MISSING] = column.size - present.size
        features[name] = FeatureReference(edges=edges.tolist(), counts=counts.tolist())
    score = None
    if scores is not None:
        values = np.asarray(scores, dtype=np.float64).ravel()
        bounds = np.asarray((*SCORE_BUCKETS, math.inf))
        score = np.bincount(
            np.searchsorted(bounds, values, side="left"), minlength=bounds.size
        ).tolist()
    return Reference(rows=int(rows.shape[0]), features=features, score=score)


def reference_scores(outputs: np.ndarray, task: str) -> np.ndarray | None:
    """What `prediction_scores` records for these outputs (see `router.score_sample` and the
    personalization pipeline's relevance), or None for a task with no recorded score."""
    outputs = np.asarray(outputs)
    if task == "binary":
        return outputs
    if task == "multiclass":
        return outputs.max(axis=1)
    if task == "multi_output":
        return np.clip(outputs[:, 0], 0.0, 1.0)
    return None


def psi(reference: Sequence[float], live: Sequence[float]) -> float | None:
    """Population stability index of `live` against `reference` counts (same bins); None when
    either side is empty."""
    ref = np.asarray(reference, dtype=np.float64)
    now = np.asarray(live, dtype=np.float64)
    if ref.sum() <= 0 or now.sum() <= 0:
        return None
    p = np.maximum(ref / ref.sum(), EPS)
    q = np.maximum(now / now.sum(), EPS)
    return float(np.sum((q - p) * np.log(q / p)))


# --- live counting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftMetrics:
    bins: Counter
    psi: Gauge


@lru_cache
def drift_metrics() -> DriftMetrics:
    # created lazily, like tiffin.metrics: BentoML sets the multiprocess directory after import
    return DriftMetrics(
        bins=Counter(
            "ml_feature_bin",
            "Feature values seen, by the reference bin of the answering version they fall in",
            ["model", "version", "feature", "bin"],
        ),
        psi=Gauge(
            "ml_feature_drift_psi",
            "PSI of live traffic against the version's reference, over every replica "
            f"(feature {SCORE_FEATURE!r}: the score), once it has TIFFIN_DRIFT_MIN_SAMPLES live "
            "values; refreshed on each /metrics scrape",
            ["model", "version", "feature"],
            multiprocess_mode="livemostrecent",
        ),
    )


@dataclass
class _Binner:
    """One version's edges, its counter children, and the counts not yet added to them.

    Slot `j * SLOTS + c` counts feature j's values with c edges at or below them, where the
    edges start with -inf (below every number, never below NaN): NaN counts 0, the missing
    slot, and a value in reference bin b counts b + 1 (`np.searchsorted(edges, v, "right")`).
    """

    edges: np.ndarray
    """(features, MAX_BINS): -inf, the reference's interior edges, +inf padding; float32."""
    edge_lists: list[list[float]]
    """Per feature, the interior edges as Python floats (exactly the float32 values)."""
    children: list[Any]
    pending: list[float]
    offsets: list[int]

    def add(self, rows: np.ndarray) -> None:
        pending = self.pending
        if rows.shape[0] <= PYTHON_ROWS:
            # a request's row or few: a bisect per value beats numpy's per-call overhead
            # (~2 us against ~5 us for 16 features)
            for row in rows.tolist():
                for offset, edges, value in zip(self.offsets, self.edge_lists, row, strict=True):
                    pending[offset + (bisect_right(edges, value) + 1 if value == value else 0)] += 1
            return
        # a batch: one sorted search per feature
        counts = np.empty((rows.shape[1], rows.shape[0]), dtype=np.intp)
        for j, column in enumerate(rows.T):
            counts[j] = np.searchsorted(self.edges[j], column, side="right")
        counts[np.isnan(rows.T)] = 0  # np.searchsorted sorts NaN after every edge
        flat = counts + np.asarray(self.offsets)[:, None]
        totals = np.bincount(flat.ravel(), minlength=len(pending))
        for index in np.flatnonzero(totals).tolist():
            pending[index] += int(totals[index])

    def flush(self) -> None:
        pending, children = self.pending, self.children
        for index, count in enumerate(pending):
            if count:
                children[index].inc(count)
                pending[index] = 0


@dataclass
class DriftRecorder:
    """Counts each answered batch's feature values in the answering version's reference bins.
    One per worker; versions without a reference cost one dictionary lookup.

    A counter increment costs ~1 us (more in multiprocess mode), so a request's counts are kept
    in a list and added to the counters at most `flush_interval_s` later, in one pass for
    every request in between (a timer on the event loop; immediately outside one)."""

    settings: DriftSettings = field(default_factory=DriftSettings)
    _binners: dict[tuple[str, str], _Binner | None] = field(default_factory=dict)
    _flush_due: bool = False

    def record(self, ref: Any, rows: np.ndarray) -> None:
        if not self.settings.enabled:
            return
        if self.settings.sample_rate < 1.0 and random.random() >= self.settings.sample_rate:
            return
        key = (ref.name, ref.version)
        if key not in self._binners:
            self._binners[key] = _binner(ref.name, ref.version, ref.card)
        binner = self._binners[key]
        if binner is None or rows.ndim != 2 or rows.shape[1] != binner.edges.shape[0]:
            return
        binner.add(rows)
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside a request (tests, tools): count now
            self.flush()
            return
        self._flush_due = True
        loop.call_later(self.settings.flush_interval_s, self.flush)

    def flush(self) -> None:
        """Add every pending count to the Prometheus counters."""
        self._flush_due = False
        for binner in self._binners.values():
            if binner is not None:
                binner.flush()


def _binner(model: str, version: str, card: Any) -> _Binner | None:
    reference: Reference | None = getattr(card, "reference", None)
    if reference is None:
        return None
    names = list(card.feature_names)
    if set(names) != set(reference.features):
        return None
    edges = np.full((len(names), MAX_BINS), np.inf, dtype=np.float32)
    edges[:, 0] = -np.inf
    edge_lists = []
    for j, name in enumerate(names):
        # float32: the rows are float32, and a float64 edge could fall between a value and itself
        found = np.asarray(reference.features[name].edges, dtype=np.float32)
        edges[j, 1 : found.size + 1] = found
        edge_lists.append(found.tolist())
    counter = drift_metrics().bins
    children = [
        counter.labels(model, version, name, "missing" if c == 0 else str(c - 1))
        for name in names
        for c in range(SLOTS)
    ]
    offsets = [j * SLOTS for j in range(len(names))]
    return _Binner(edges, edge_lists, children, [0.0] * len(children), offsets)


# --- judging ----------------------------------------------------------------------------------


def bins_key(feature: str) -> str:
    """The snapshot field (tiffin.lifecycle.stats) holding a feature's live bin counts."""
    return f"bins:{feature}"


def report(
    model: str,
    version: str,
    reference: Reference | None,
    snapshot: Mapping[str, Any] | None,
    settings: DriftSettings,
) -> dict[str, Any]:
    """`GET /drift/{model}`'s entry for one version, from its fleet-wide snapshot."""
    if reference is None:
        return {
            "version": version,
            "reference": None,
            "reason": "this version was saved without reference distributions "
            "(trained or imported before drift tracking, or imported without reference rows)",
        }
    snap = snapshot or {}
    features = []
    for name, ref in reference.features.items():
        live = snap.get(bins_key(name)) or [0.0] * SLOTS
        features.append(_judged(name, psi(ref.counts, live), int(sum(live)), settings))
    score: dict[str, Any] | None = None
    if reference.score is not None:
        cumulative = snap.get("scores") or [0.0] * len(reference.score)
        live_scores = [
            max(c - p, 0.0) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)
        ]
        score = _judged(
            SCORE_FEATURE, psi(reference.score, live_scores), int(sum(live_scores)), settings
        )
    # The alert rule reads the gauge: set only once a value could be flagged `drifted` here, so
    # a version that has seen a handful of rows (PSI of 10 bins over 20 values is noise) cannot
    # page while /drift calls it fine.
    gauge = drift_metrics().psi
    for entry in (*features, *([score] if score else [])):
        if entry["psi"] is not None and entry["samples"] >= settings.min_samples:
            gauge.labels(model, version, entry["feature"]).set(entry["psi"])
    features.sort(key=lambda f: -(f["psi"] or 0.0))
    return {
        "version": version,
        "reference": {"rows": reference.rows},
        "samples": max((f["samples"] for f in features), default=0),
        "drifted": any(f["drifted"] for f in features) or bool(score and score["drifted"]),
        "drifted_features": [f["feature"] for f in features if f["drifted"]],
        "score": score,
        "features": features,
    }


def _judged(
    name: str, value: float | None, samples: int, settings: DriftSettings
) -> dict[str, Any]:
    return {
        "feature": name,
        "psi": None if value is None else round(value, 6),
        "samples": samples,
        "drifted": value is not None
        and samples >= settings.min_samples
        and value > settings.threshold,
    }
