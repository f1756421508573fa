"""What each endpoint does, free of HTTP: features in, runner call, response out.

The entry service's handlers only decode the request into a schema object and hand it here.
Constructed with its collaborators (runner clients, feature store), so tests can build it with
real models and a real Redis without starting a server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import numpy as np
from pydantic import BaseModel

from tiffin import featurize as fz
from tiffin.errors import InvalidInput, ModelNotFound, ModelUnavailable
from tiffin.feature_store import EntityLookup, FeatureStore
from tiffin.lifecycle import LifecycleManager
from tiffin.llm.explain import explain_fraud_or_rules
from tiffin.metrics import metrics
from tiffin.model_pool import ModelPool
from tiffin.runtimes import LoadedModel
from tiffin.schemas import (
    AdFraudRequest,
    AdFraudResponse,
    BatchResponse,
    BidRequest,
    BidResponse,
    CardFraudRequest,
    CardFraudResponse,
    CtrRequest,
    CtrResponse,
    FeatureStatus,
    GenericPredictRequest,
    GenericPredictResponse,
    PersonalizationRequest,
    PersonalizationResponse,
)

RiskLevel = Literal["low", "medium", "high"]
Action = Literal["approve", "review", "decline"]
log = logging.getLogger("tiffin.scoring")
_EXPLAINED_FIELDS = (
    "fraud_score",
    "risk_level",
    "recommended_action",
    "top_risk_factors",
    "explanation",
)
FRAUD_FAMILIES = {"fraud_detection", "fraud", "card_fraud"}


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def risk_band(score: float) -> tuple[RiskLevel, Action]:
    """(risk_level, recommended_action) for a fraud probability."""
    if score < 0.3:
        return "low", "approve"
    if score < 0.7:
        return "medium", "review"
    return "high", "decline"


def top_factors(
    contributions: np.ndarray,
    groups: Mapping[str, Sequence[str]],
    feature_names: Sequence[str],
    limit: int = 3,
) -> list[str]:
    """Named factor groups ranked by their summed positive contribution to this prediction."""
    index = {name: i for i, name in enumerate(feature_names)}
    totals = {
        factor: float(sum(contributions[index[f]] for f in members if f in index))
        for factor, members in groups.items()
    }
    ranked = sorted((t, f) for f, t in totals.items() if t > 0.05)
    return [f for _, f in reversed(ranked)][:limit]


def explain_fraud(level: str, factors: Sequence[str]) -> str:
    readable = ", ".join(f.replace("_", " ") for f in factors)
    if level == "low":
        return "Transaction appears legitimate with low risk indicators"
    if level == "medium":
        return f"Elevated risk; review suggested ({readable or 'mixed signals'})"
    return f"High fraud risk driven by {readable or 'the overall pattern'}"


def user_segment(user: np.ndarray) -> str:
    sessions, _, purchases, order_value, days_away, engagement = (float(v) for v in user[:6])
    value = (
        "high_value"
        if purchases >= 2 and order_value >= 60
        else "new"
        if sessions <= 1
        else "regular"
    )
    activity = "engaged" if engagement >= 0.5 else "dormant" if days_away > 14 else "casual"
    return f"{value}_{activity}"


def behavioral_signals(user: np.ndarray, session: EntityLookup, affinity: float) -> list[str]:
    signals = []
    if session.found:
        pages, duration, cart_adds = (float(v) for v in session.values)
        if duration >= 300 or pages >= 8:
            signals.append("high_engagement_session")
        if pages >= 3:
            signals.append("multi_page_session")
        if cart_adds > 0:
            signals.append("cart_activity")
    if affinity >= 0.3:
        signals.append("category_affinity")
    if float(user[2]) >= 3:
        signals.append("frequent_buyer")
    if float(user[4]) > 14:
        signals.append("lapsing_user")
    return signals


def _feature_status(store: FeatureStore, lookups: Sequence[EntityLookup]) -> FeatureStatus:
    return FeatureStatus(
        source=store.backend,
        defaults_used=[
            f"{lk.kind}:{lk.entity_id}" for lk in lookups if not lk.found and lk.entity_id
        ],
        degraded=any(lk.degraded for lk in lookups),
    )


def _freshness(lookups: Sequence[EntityLookup], now: float) -> int | None:
    ages = [age for lk in lookups if (age := lk.age_seconds(now)) is not None]
    return round(max(ages)) if ages else None


@dataclass
class Observation:
    """Records one scoring call in the seeds' metrics."""

    model: str
    version: str
    started: float

    def done(self, scores: np.ndarray | Sequence[float] | None = None) -> None:
        m = metrics()
        m.requests.labels(self.model, self.version, "success").inc()
        m.duration.labels(self.model, self.version).observe(time.perf_counter() - self.started)
        if scores is not None:
            hist = m.scores.labels(self.model, self.version)
            for s in np.ravel(scores)[:256]:
                hist.observe(float(s))

    def failed(self, kind: str) -> None:
        m = metrics()
        m.requests.labels(self.model, self.version, "error").inc()
        m.errors.labels(self.model, self.version, kind).inc()


class Scoring:
    """Every endpoint's logic. `pool_of(name)` resolves a model family to its loaded versions;
    `lifecycle`, when given, routes each request to a version (splits, canaries, A/B, shadows)."""

    def __init__(
        self,
        pool_of: Callable[[str], ModelPool],
        store: FeatureStore,
        v1_model: str,
        lifecycle: LifecycleManager | None = None,
    ) -> None:
        self.pool_of = pool_of
        self.store = store
        self.v1_model = v1_model
        self.lifecycle = lifecycle

    # --- routing ------------------------------------------------------------------------------

    def _model(self, family: str, entity: str | None, pinned: str | None = None) -> LoadedModel:
        """The version this request goes to: pinned, else routed, else the family's default."""
        version = pinned or (self.lifecycle.choose(family, entity) if self.lifecycle else None)
        return self.pool_of(family).get(version)

    def _infer(
        self, model: LoadedModel, x: np.ndarray, started: float, pinned: bool = False
    ) -> tuple[LoadedModel, np.ndarray, Observation]:
        """Predict; a version that raises or returns non-finite scores is recorded as failing and
        the request is answered by the stable version instead (unless the client pinned it)."""
        obs = Observation(model.name, model.version, started)
        try:
            return model, _finite(model.predict(x), model), obs
        except InvalidInput:
            raise
        except Exception as exc:
            obs.failed("predict")
            log.warning("%s:%s failed a prediction: %s", model.name, model.version, exc)
            pool = self.pool_of(model.name)
            stable = (self.lifecycle.stable(model.name) if self.lifecycle else None) or (
                pool.default_version
            )
            if pinned or stable == model.version:
                raise ModelUnavailable(f"model {model.name}:{model.version} failed: {exc}") from exc
            fallback = pool.get(stable)
            obs = Observation(fallback.name, fallback.version, started)
            return fallback, _finite(fallback.predict(x), fallback), obs
        finally:
            self._mirror(model.name, x)

    def _mirror(self, family: str, x: np.ndarray) -> None:
        """Shadow versions score a copy of the request after it is answered; never returned."""
        if self.lifecycle is None:
            return
        for version in self.lifecycle.shadows(family):
            asyncio.get_running_loop().call_soon(self._shadow, family, version, x)

    def _shadow(self, family: str, version: str, x: np.ndarray) -> None:
        obs = Observation(family, version, time.perf_counter())
        try:
            model = self.pool_of(family).get(version)
            scores = _finite(model.predict(x), model)
        except Exception:
            obs.failed("shadow")
            return
        obs.done(_score_sample(scores, model))

    # --- feature store ------------------------------------------------------------------------

    async def _fetch(
        self, model: str, version: str, wanted: list[tuple[str, str | None]]
    ) -> list[EntityLookup]:
        started = time.perf_counter()
        lookups = await self.store.fetch(wanted)
        metrics().feature_fetch.labels(model, version, self.store.backend).observe(
            time.perf_counter() - started
        )
        return lookups

    # --- seed 000 -----------------------------------------------------------------------------

    async def ad_fraud(self, req: AdFraudRequest) -> AdFraudResponse:
        started = time.perf_counter()
        x = fz.to_matrix([fz.ad_fraud_row(req.__dict__)])
        model, scores, obs = self._infer(self._model("fraud_detection", req.user_id), x, started)
        score = float(scores[0])
        level, _ = risk_band(score)
        obs.done(scores)
        return AdFraudResponse(
            user_id=req.user_id,
            fraud_probability=round(score, 6),
            is_fraud=score >= 0.5,
            risk_level=level,
            model_version=model.version,
            latency_ms=_ms_since(started),
        )

    async def ctr(self, req: CtrRequest) -> CtrResponse:
        started = time.perf_counter()
        x = fz.to_matrix([fz.ctr_row(req.__dict__)])
        model, scores, obs = self._infer(
            self._model("ctr_prediction", req.placement_id), x, started
        )
        obs.done(scores)
        return CtrResponse(
            placement_id=req.placement_id,
            predicted_ctr=round(float(scores[0]), 6),
            model_version=model.version,
            latency_ms=_ms_since(started),
        )

    async def bid(self, req: BidRequest) -> BidResponse:
        started = time.perf_counter()
        x = fz.to_matrix([fz.bid_row(req.__dict__)])
        chosen = self._model("bid_optimization", req.placement_id)
        model, values, obs = self._infer(chosen, x, started)
        optimal = float(values[0])
        bid = max(optimal, req.floor_cpm)
        affordable = req.budget_remaining >= bid / 1000  # one impression at this CPM
        if not affordable:
            reason = "budget_remaining cannot pay for one impression at the floor"
        elif optimal < req.floor_cpm:
            reason = "model value is below the floor; bidding the floor"
        else:
            reason = "model value clears the floor"
        obs.done()
        return BidResponse(
            placement_id=req.placement_id,
            recommended_bid_cpm=round(bid, 4),
            floor_cpm=req.floor_cpm,
            should_bid=affordable,
            reason=reason,
            model_version=model.version,
            latency_ms=_ms_since(started),
        )

    # --- seed 001 -----------------------------------------------------------------------------

    async def card_fraud_many(
        self, reqs: Sequence[CardFraudRequest], pinned: str | None = None
    ) -> tuple[str, list[CardFraudResponse]]:
        started = time.perf_counter()
        chosen = self._model("card_fraud", reqs[0].card_id, pinned)
        wanted: list[tuple[str, str | None]] = []
        for r in reqs:
            wanted += [("card", r.card_id), ("merchant", r.merchant_id)]
        lookups = await self._fetch(chosen.name, chosen.version, wanted)
        now = time.time()
        x = fz.to_matrix(
            [
                fz.card_fraud_row(r.__dict__, lookups[2 * i].values, lookups[2 * i + 1].values)
                for i, r in enumerate(reqs)
            ]
        )
        model, scores, obs = self._infer(chosen, x, started, pinned=pinned is not None)
        contributions = await _contributions(model, x)
        names = fz.CARD_FRAUD_FEATURES
        results = []
        for i, r in enumerate(reqs):
            score = float(scores[i])
            level, action = risk_band(score)
            factors = top_factors(contributions[i], fz.CARD_RISK_FACTORS, names)
            pair = lookups[2 * i : 2 * i + 2]
            results.append(
                CardFraudResponse(
                    fraud_score=round(score, 6),
                    risk_level=level,
                    confidence=round(max(score, 1 - score), 6),
                    recommended_action=action,
                    explanation=explain_fraud(level, factors),
                    top_risk_factors=factors,
                    features_used=len(names),
                    latency_ms=_ms_since(started),
                    model_version=model.version,
                    feature_freshness_sec=_freshness(pair, now),
                    card_id=r.card_id,
                    features=_feature_status(self.store, pair),
                )
            )
        obs.done(scores)
        return model.version, results

    async def card_fraud(self, req: CardFraudRequest) -> CardFraudResponse:
        response = (await self.card_fraud_many([req]))[1][0]
        if req.llm_explanation:
            context = {
                **req.model_dump(exclude={"llm_explanation"}),
                **response.model_dump(include=set(_EXPLAINED_FIELDS)),
            }
            written, source = await explain_fraud_or_rules(context)
            response.llm_explanation, response.llm_explanation_source = written, source
        return response

    async def personalization_many(
        self, reqs: Sequence[PersonalizationRequest], pinned: str | None = None
    ) -> tuple[str, list[PersonalizationResponse]]:
        started = time.perf_counter()
        chosen = self._model("personalization", reqs[0].user_id, pinned)
        wanted: list[tuple[str, str | None]] = []
        for r in reqs:
            wanted += [("user", r.user_id), ("item", r.item_id), ("session", r.session_id)]
        lookups = await self._fetch(chosen.name, chosen.version, wanted)
        now = time.time()
        rows = [
            fz.personalization_row(r.__dict__, *(lk.values for lk in lookups[3 * i : 3 * i + 3]))
            for i, r in enumerate(reqs)
        ]
        model, raw, obs = self._infer(
            chosen, fz.to_matrix(rows), started, pinned=pinned is not None
        )
        outputs = np.clip(raw, 0.0, 1.0)
        results = []
        for i, r in enumerate(reqs):
            user, _item, session = lookups[3 * i : 3 * i + 3]
            relevance, conversion, engagement = (round(float(v), 6) for v in outputs[i])
            results.append(
                PersonalizationResponse(
                    relevance_score=relevance,
                    conversion_probability=conversion,
                    engagement_score=engagement,
                    user_segment=user_segment(user.values),
                    behavioral_signals=behavioral_signals(user.values, session, rows[i][6]),
                    features_used=len(fz.PERSONALIZATION_FEATURES),
                    latency_ms=_ms_since(started),
                    model_version=model.version,
                    user_id=r.user_id,
                    item_id=r.item_id,
                    feature_freshness_sec=_freshness(lookups[3 * i : 3 * i + 3], now),
                    features=_feature_status(self.store, lookups[3 * i : 3 * i + 3]),
                )
            )
        obs.done(outputs[:, 0])
        return model.version, results

    async def personalization(self, req: PersonalizationRequest) -> PersonalizationResponse:
        return (await self.personalization_many([req]))[1][0]

    async def batch(
        self, model_type: str, requests: Sequence[Mapping[str, Any]], batch_id: str | None
    ) -> BatchResponse:
        started = time.perf_counter()
        schema: type[BaseModel] = (
            CardFraudRequest if model_type in FRAUD_FAMILIES else PersonalizationRequest
        )
        parsed = [_parse_item(schema, item, i) for i, item in enumerate(requests)]
        results: Sequence[CardFraudResponse | PersonalizationResponse]
        if schema is CardFraudRequest:
            version, results = await self.card_fraud_many(parsed)
        else:
            version, results = await self.personalization_many(parsed)
        return BatchResponse(
            batch_id=batch_id,
            model_type=model_type,
            count=len(results),
            results=[r.model_dump() for r in results],
            model_version=version,
            latency_ms=_ms_since(started),
        )

    # --- seed 003 -----------------------------------------------------------------------------

    async def generic_predict(self, req: GenericPredictRequest) -> GenericPredictResponse:
        started = time.perf_counter()
        try:
            chosen = self._model(req.model_name, req.correlation_id, req.version)
        except ModelNotFound as exc:
            raise ModelNotFound(f"model_name: {exc}") from exc
        x = columns_to_matrix(req.features, chosen.card.feature_names)
        model, outputs, obs = self._infer(chosen, x, started, pinned=req.version is not None)
        obs.done(outputs if model.card.task == "binary" else None)
        return GenericPredictResponse(
            **encode_outputs(outputs, model.card.task),
            correlation_id=req.correlation_id or str(uuid.uuid4()),
            model_name=model.name,
            model_version=model.version,
            latency_ms=_ms_since(started),
        )

    # --- seed 004 -----------------------------------------------------------------------------

    async def v1_predict(self, instances: list[list[float]], version: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            chosen = self._model(self.v1_model, None, version)
        except ModelNotFound as exc:
            raise ModelNotFound(f"version: {exc}") from exc
        widths = {len(row) for row in instances}
        if widths != {chosen.n_features}:
            raise InvalidInput(
                f"instances: every instance needs {chosen.n_features} values "
                f"({', '.join(chosen.card.feature_names)}); got lengths {sorted(widths)}"
            )
        x = fz.to_matrix(instances)
        model, raw, obs = self._infer(chosen, x, started, pinned=version is not None)
        outputs = raw.astype(np.float64)
        body: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
        if model.card.task in ("binary", "multiclass"):
            probs = outputs if outputs.ndim == 2 else np.column_stack([1 - outputs, outputs])
            labels = model.card.output_names or [f"class_{k}" for k in range(probs.shape[1])]
            body["predictions"] = [labels[k] for k in probs.argmax(axis=1)]
            body["probabilities"] = np.round(probs, 6).tolist()
        else:
            body["predictions"] = np.round(outputs, 6).tolist()
        obs.done(_score_sample(raw, model))
        body["latency_ms"] = _ms_since(started)
        return body


def _finite(scores: np.ndarray, model: LoadedModel) -> np.ndarray:
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{model.name}:{model.version} returned non-finite scores")
    return scores


def _score_sample(scores: np.ndarray, model: LoadedModel) -> np.ndarray | None:
    """What `prediction_scores` records: P(positive) for binary, top-class probability otherwise."""
    if model.card.task == "binary":
        return scores
    if model.card.task == "multiclass":
        return scores.max(axis=1)
    return None


async def _contributions(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    if model.explainer is None:
        return np.zeros_like(x)
    if len(x) <= 8:
        return model.explainer.contributions(x)
    return await anyio.to_thread.run_sync(model.explainer.contributions, x)


def _parse_item(schema: type[BaseModel], item: Mapping[str, Any], index: int) -> Any:
    from pydantic import ValidationError

    try:
        return schema.model_validate(item)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"requests[{index}].{field}: {first['msg']}") from None


def columns_to_matrix(
    columns: Mapping[str, Sequence[float]], feature_names: Sequence[str]
) -> np.ndarray:
    """Seed 003's column-oriented `features` as a row matrix in the model's feature order."""
    missing = [f for f in feature_names if f not in columns]
    unknown = [f for f in columns if f not in feature_names]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown)}")
        raise InvalidInput(
            f"features: {'; '.join(parts)} (model expects {', '.join(feature_names)})"
        )
    lengths = {len(columns[f]) for f in feature_names}
    if len(lengths) != 1 or 0 in lengths:
        raise InvalidInput("features: every feature needs the same, non-zero number of values")
    return np.asarray([columns[f] for f in feature_names], dtype=np.float32).T.copy()


def encode_outputs(outputs: np.ndarray, task: str) -> dict[str, Any]:
    """Seed 003's `prediction` / `confidence` / `probabilities` for any task."""
    outputs = outputs.astype(np.float64)  # round in float64, or float32 noise shows in the JSON
    if task in ("binary", "multiclass"):
        probs = outputs if outputs.ndim == 2 else np.column_stack([1 - outputs, outputs])
        return {
            "prediction": probs.argmax(axis=1).astype(int).tolist(),
            "confidence": np.round(probs.max(axis=1), 6).tolist(),
            "probabilities": {
                f"class_{k}": np.round(probs[:, k], 6).tolist() for k in range(probs.shape[1])
            },
        }
    first = outputs if outputs.ndim == 1 else outputs[:, 0]
    return {"prediction": np.round(first, 6).tolist(), "confidence": [], "probabilities": {}}
