"""What each endpoint does, free of HTTP: features in, runner call, response out.

The entry service's handlers only decode the request into a schema object and hand it here.
Constructed with its collaborators (runner clients, feature store), so tests can build it with
real models and a real Redis without starting a server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import TypeAdapter, ValidationError

from tiffin import featurize as fz
from tiffin.errors import InvalidInput, ModelNotFound, ModelUnavailable
from tiffin.feature_store import EntityColumns, FeatureStore
from tiffin.lifecycle.manager import LifecycleManager
from tiffin.llm.explain import explain_fraud_or_rules
from tiffin.metrics import metrics, observe_many
from tiffin.model_pool import ModelPool
from tiffin.runtimes import LoadedModel
from tiffin.schemas import (
    AdFraudRequest,
    AdFraudResponse,
    BidRequest,
    BidResponse,
    CardFraudRequest,
    CtrRequest,
    CtrResponse,
    GenericPredictRequest,
    GenericPredictResponse,
    PersonalizationRequest,
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


class FactorRanking:
    """Named groups of features ranked, per prediction, by their summed contribution.

    A group is reported when its sum exceeds `floor`; the sums for a whole batch are one matrix
    product with the group membership matrix.
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[str]],
        feature_names: Sequence[str],
        limit: int = 3,
        floor: float = 0.05,
    ) -> None:
        index = {name: i for i, name in enumerate(feature_names)}
        self.names = list(groups)
        self.membership = np.zeros((len(feature_names), len(groups)))
        for j, members in enumerate(groups.values()):
            for feature in members:
                if feature in index:
                    self.membership[index[feature], j] = 1.0
        self.limit = limit
        self.floor = floor

    def top(self, contributions: np.ndarray) -> list[list[str]]:
        totals = np.asarray(contributions, dtype=np.float64) @ self.membership
        order = np.argsort(-totals, axis=1, kind="stable")[:, : self.limit].tolist()
        names, floor = self.names, self.floor
        return [
            [names[j] for j in ranked if sums[j] > floor]
            for ranked, sums in zip(order, totals.tolist(), strict=True)
        ]


CARD_FACTORS = FactorRanking(fz.CARD_RISK_FACTORS, fz.CARD_FRAUD_FEATURES)


def explain_fraud(level: str, factors: Sequence[str]) -> str:
    return _explanation(level, tuple(factors))


@functools.lru_cache(maxsize=1024)  # few (level, factors) combinations exist; batches repeat them
def _explanation(level: str, factors: tuple[str, ...]) -> str:
    readable = ", ".join(f.replace("_", " ") for f in factors)
    if level == "low":
        return "Transaction appears legitimate with low risk indicators"
    if level == "medium":
        return f"Elevated risk; review suggested ({readable or 'mixed signals'})"
    return f"High fraud risk driven by {readable or 'the overall pattern'}"


def user_segment(user: Sequence[float]) -> str:
    sessions, _, purchases, order_value, days_away, engagement = user[:6]
    value = (
        "high_value"
        if purchases >= 2 and order_value >= 60
        else "new"
        if sessions <= 1
        else "regular"
    )
    activity = "engaged" if engagement >= 0.5 else "dormant" if days_away > 14 else "casual"
    return f"{value}_{activity}"


def behavioral_signals(
    user: Sequence[float], session: Sequence[float] | None, affinity: float
) -> list[str]:
    """`session` None: the request named no session, or it was not found."""
    signals = []
    if session is not None:
        pages, duration, cart_adds = session
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


class EntityReport:
    """Per row, what seed 001 reports about the features behind it: `feature_freshness_sec`
    (age of the oldest record used) and `features` (source, entities on defaults, degraded)."""

    def __init__(self, backend: str, columns: Sequence[EntityColumns], now: float) -> None:
        oldest = np.fmin.reduce([c.written_at for c in columns])  # NaN only when none was found
        self.freshness = [
            None if written != written else round(max(now - written, 0.0))
            for written in oldest.tolist()
        ]
        self.columns = columns
        self.missing = ~np.logical_and.reduce([c.found for c in columns])
        degraded = any(c.degraded for c in columns)
        self._clean = {"source": backend, "defaults_used": [], "degraded": degraded}

    def observe(self, model: str, version: str) -> None:
        ages = [age for age in self.freshness if age is not None]
        if ages:
            observe_many(metrics().feature_age.labels(model, version), np.asarray(ages))

    def status(self, row: int) -> dict[str, Any]:
        if not self.missing[row]:
            return self._clean
        used = [d for c in self.columns if (d := c.defaults_used(row)) is not None]
        return {**self._clean, "defaults_used": used}


@dataclass
class Observation:
    """Records one scoring call in the seeds' metrics."""

    model: str
    version: str
    started: float
    rows: int = 1

    def done(self, scores: np.ndarray | Sequence[float] | None = None) -> None:
        m = metrics()
        m.requests.labels(self.model, self.version, "success").inc()
        m.batch_size.labels(self.model, self.version).observe(self.rows)
        m.duration.labels(self.model, self.version).observe(time.perf_counter() - self.started)
        if scores is not None:
            observe_many(m.scores.labels(self.model, self.version), np.asarray(scores))

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
        model, scores, _, obs = self._infer_explained(model, x, started, pinned, explain=False)
        return model, scores, obs

    def _infer_explained(
        self,
        model: LoadedModel,
        x: np.ndarray,
        started: float,
        pinned: bool = False,
        explain: bool = True,
    ) -> tuple[LoadedModel, np.ndarray, np.ndarray | None, Observation]:
        """Predict (and explain); a version that raises or returns non-finite scores is recorded
        as failing and the request is answered by the stable version instead (unless the client
        pinned it). Contributions: None when not asked for, zeros when not available."""
        obs = Observation(model.name, model.version, started, len(x))
        try:
            scores, contributions = _predict(model, x, explain)
            return model, _finite(scores, model), contributions, obs
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
            obs = Observation(fallback.name, fallback.version, started, len(x))
            scores, contributions = _predict(fallback, x, explain)
            return fallback, _finite(scores, fallback), contributions, obs
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
        self, model: LoadedModel, wanted: Mapping[str, Sequence[str | None]]
    ) -> dict[str, EntityColumns]:
        started = time.perf_counter()
        columns = await self.store.fetch_columns(wanted)
        metrics().feature_fetch.labels(model.name, model.version, self.store.backend).observe(
            time.perf_counter() - started
        )
        return columns

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
    ) -> tuple[str, list[dict[str, Any]]]:
        """Seed 001's response for each transaction, as plain dicts (encoded once by the caller)."""
        started = time.perf_counter()
        chosen = self._model("card_fraud", reqs[0].card_id, pinned)
        entities = await self._fetch(
            chosen,
            {"card": [r.card_id for r in reqs], "merchant": [r.merchant_id for r in reqs]},
        )
        cards, merchants = entities["card"], entities["merchant"]
        x = fz.card_fraud_matrix(
            [r.transaction_amount for r in reqs],
            [r.mcc_code for r in reqs],
            [r.country_code for r in reqs],
            cards.values,
            merchants.values,
        )
        model, scores, contributions, obs = self._infer_explained(
            chosen, x, started, pinned=pinned is not None
        )
        assert contributions is not None  # asked for, so always an array
        factors = CARD_FACTORS.top(contributions)
        report = EntityReport(self.store.backend, (cards, merchants), time.time())
        report.observe(model.name, model.version)
        rounded = np.round(scores.astype(np.float64), 6).tolist()
        latency = _ms_since(started)
        results = []
        for i, r in enumerate(reqs):
            score = rounded[i]
            level, action = risk_band(score)
            results.append(
                {
                    "fraud_score": score,
                    "risk_level": level,
                    "confidence": round(max(score, 1 - score), 6),
                    "recommended_action": action,
                    "explanation": explain_fraud(level, factors[i]),
                    "top_risk_factors": factors[i],
                    "features_used": len(fz.CARD_FRAUD_FEATURES),
                    "latency_ms": latency,
                    "model_version": model.version,
                    "feature_freshness_sec": report.freshness[i],
                    "card_id": r.card_id,
                    "features": report.status(i),
                }
            )
        obs.done(scores)
        return model.version, results

    async def card_fraud(self, req: CardFraudRequest) -> dict[str, Any]:
        response = (await self.card_fraud_many([req]))[1][0]
        response["llm_explanation"] = response["llm_explanation_source"] = None
        if req.llm_explanation:
            context = {
                **req.model_dump(exclude={"llm_explanation"}),
                **{field: response[field] for field in _EXPLAINED_FIELDS},
            }
            written, source = await explain_fraud_or_rules(context)
            response["llm_explanation"] = written.model_dump(mode="json")
            response["llm_explanation_source"] = source
        return response

    async def personalization_many(
        self, reqs: Sequence[PersonalizationRequest], pinned: str | None = None
    ) -> tuple[str, list[dict[str, Any]]]:
        started = time.perf_counter()
        chosen = self._model("personalization", reqs[0].user_id, pinned)
        entities = await self._fetch(
            chosen,
            {
                "user": [r.user_id for r in reqs],
                "item": [r.item_id for r in reqs],
                "session": [r.session_id for r in reqs],
            },
        )
        users, items, sessions = entities["user"], entities["item"], entities["session"]
        rows = [
            fz.personalization_row(r.__dict__, users.values[i], items.values[i], sessions.values[i])
            for i, r in enumerate(reqs)
        ]
        model, raw, obs = self._infer(
            chosen, fz.to_matrix(rows), started, pinned=pinned is not None
        )
        outputs = np.round(np.clip(raw, 0.0, 1.0).astype(np.float64), 6).tolist()
        report = EntityReport(self.store.backend, (users, items, sessions), time.time())
        report.observe(model.name, model.version)
        user_values, session_values = users.values.tolist(), sessions.values.tolist()
        latency = _ms_since(started)
        results = []
        for i, r in enumerate(reqs):
            relevance, conversion, engagement = outputs[i]
            session = session_values[i] if sessions.found[i] else None
            results.append(
                {
                    "relevance_score": relevance,
                    "conversion_probability": conversion,
                    "engagement_score": engagement,
                    "user_segment": user_segment(user_values[i]),
                    "behavioral_signals": behavioral_signals(user_values[i], session, rows[i][6]),
                    "features_used": len(fz.PERSONALIZATION_FEATURES),
                    "latency_ms": latency,
                    "model_version": model.version,
                    "user_id": r.user_id,
                    "item_id": r.item_id,
                    "feature_freshness_sec": report.freshness[i],
                    "features": report.status(i),
                }
            )
        obs.done(np.clip(raw, 0.0, 1.0)[:, 0])
        return model.version, results

    async def personalization(self, req: PersonalizationRequest) -> dict[str, Any]:
        return (await self.personalization_many([req]))[1][0]

    async def batch(
        self, model_type: str, requests: Sequence[Mapping[str, Any]], batch_id: str | None
    ) -> dict[str, Any]:
        started = time.perf_counter()
        results: list[dict[str, Any]]
        if model_type in FRAUD_FAMILIES:
            version, results = await self.card_fraud_many(_parse_items(_CARD_ITEMS, requests))
        else:
            version, results = await self.personalization_many(
                _parse_items(_PERSONALIZATION_ITEMS, requests)
            )
        return {
            "batch_id": batch_id,
            "model_type": model_type,
            "count": len(results),
            "results": results,
            "model_version": version,
            "latency_ms": _ms_since(started),
        }

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


def _predict(
    model: LoadedModel, x: np.ndarray, explain: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Explanations are an extra: a version whose explainer fails still serves its scores."""
    if not explain:
        return model.predict(x), None
    try:
        return model.predict_explained(x)
    except Exception as exc:
        log.warning("%s:%s failed to predict with explanations: %s", model.name, model.version, exc)
        metrics().errors.labels(model.name, model.version, "explain").inc()
        return model.predict(x), np.zeros_like(x)


_CARD_ITEMS = TypeAdapter(list[CardFraudRequest])
_PERSONALIZATION_ITEMS = TypeAdapter(list[PersonalizationRequest])


def _parse_items(adapter: TypeAdapter[list[Any]], items: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Every item validated in one pass; the first problem is named as `requests[i].field`."""
    try:
        return adapter.validate_python(items)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        index, *field = first["loc"]
        where = ".".join(str(p) for p in field)
        raise InvalidInput(
            f"requests[{index}]{'.' + where if where else ''}: {first['msg']}"
        ) from None


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
