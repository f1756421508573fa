"""What each scoring endpoint does, free of HTTP: one fixed, timed pipeline per model family.

`Pipeline.__call__` is the only place the sequence is written: route (choose the version) →
features (from the request and the feature store, in that version's feature order) → predict
(and explain) through the router → respond (the seed's body). Each stage's time goes into
`ml_pipeline_stage_seconds`; the request into the seeds' per-model metrics. A pipeline only
says what differs: its family, the entity that keeps routing sticky, how features are built, and
how the answer is encoded. Route before features: the generic and v1 pipelines need the chosen
version's feature order to build their matrix.
"""

from __future__ import annotations

import functools
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import TypeAdapter, ValidationError

from tiffin import featurize as fz
from tiffin.errors import InvalidInput, ModelNotFound
from tiffin.families import ModelRef
from tiffin.feature_store import EntityColumns, FeatureStore
from tiffin.lifecycle.router import Answer, Router, score_sample
from tiffin.llm.response_models import FraudExplanation
from tiffin.logs import bind
from tiffin.metrics import (
    STAGE_SAMPLE,
    feature_fetch,
    observe_feature_age,
    observe_many,
    of_version,
)
from tiffin.model_store import ModelCard
from tiffin.schemas import (
    AdFraudRequest,
    AdFraudResponse,
    BidRequest,
    BidResponse,
    CardFraudRequest,
    Contribution,
    CtrRequest,
    CtrResponse,
    Explanations,
    GenericPredictRequest,
    PersonalizationRequest,
    RowExplanation,
)
from tiffin.tracing import FEATURE_FETCH, MODEL_CALL, Spans

RiskLevel = Literal["low", "medium", "high"]
Action = Literal["approve", "review", "decline"]
Req = TypeVar("Req")
Out = TypeVar("Out")
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


@dataclass
class Features:
    rows: np.ndarray
    context: Any = None
    """Whatever `respond` needs besides the rows (entity lookups, raw request rows)."""


class Pipeline(Generic[Req, Out]):
    """decode (done by the caller's schema) → route → features → predict → respond."""

    family: ClassVar[str]
    explain: ClassVar[bool] = False
    route_field: ClassVar[str | None] = None
    """The request field an unknown model or version is reported against (404 naming it)."""

    def __init__(self, router: Router, store: FeatureStore, spans: Spans) -> None:
        self.router = router
        self.store = store
        self.spans = spans
        self._turns = itertools.count()  # which requests' stage times are recorded

    async def __call__(self, request: Req, pinned: str | None = None) -> Out:
        started = time.perf_counter()
        try:
            choice = await self.router.choose(
                self.family_of(request), self.entity(request), pinned or self.pinned(request)
            )
        except ModelNotFound as exc:
            if self.route_field is None:
                raise
            raise ModelNotFound(f"{self.route_field}: {exc}") from exc
        ref = choice.ref
        bind(model=ref.name, version=ref.version)
        routed = time.perf_counter()
        features = await self.features(request, ref)
        featured = time.perf_counter()
        with self.spans.span(MODEL_CALL, model=ref.name, version=ref.version):
            answer = await self.router.predict(
                choice, features.rows, started, self.explains(request)
            )
        predicted = time.perf_counter()
        out = self.respond(request, features, answer, started)
        responded = time.perf_counter()
        answer.observation.done(self.recorded(answer))
        if next(self._turns) % STAGE_SAMPLE == 0:
            answer.observation.stages(
                routed - started, featured - routed, predicted - featured, responded - predicted
            )
        return out

    def family_of(self, request: Req) -> str:
        return self.family

    def explains(self, request: Req) -> bool:
        """Whether to ask the model for per-feature contributions too."""
        return self.explain

    def entity(self, request: Req) -> str | None:
        """Requests for the same entity go to the same version while the weights stand."""
        return None

    def pinned(self, request: Req) -> str | None:
        return None

    async def features(self, request: Req, ref: ModelRef) -> Features:
        raise NotImplementedError

    def respond(self, request: Req, features: Features, answer: Answer, started: float) -> Out:
        raise NotImplementedError

    def recorded(self, answer: Answer) -> np.ndarray | None:
        """The scores `prediction_scores` records (None: this task has no score to record)."""
        return answer.scores

    async def fetch(
        self, ref: ModelRef, wanted: Mapping[str, Sequence[str | None]]
    ) -> dict[str, EntityColumns]:
        started = time.perf_counter()
        with self.spans.span(
            FEATURE_FETCH, model=ref.name, version=ref.version, backend=self.store.backend
        ):
            columns = await self.store.fetch_columns(wanted)
        feature_fetch(ref.name, ref.version, self.store.backend).observe(
            time.perf_counter() - started
        )
        observe_feature_age(ref.name, ref.version, columns.values())
        return columns


# --- seed 000 ---------------------------------------------------------------------------------


def risk_band(score: float) -> tuple[RiskLevel, Action]:
    """(risk_level, recommended_action) for a fraud probability."""
    if score < 0.3:
        return "low", "approve"
    if score < 0.7:
        return "medium", "review"
    return "high", "decline"


class AdFraudPipeline(Pipeline[AdFraudRequest, AdFraudResponse]):
    family = "fraud_detection"

    def entity(self, request: AdFraudRequest) -> str | None:
        return request.user_id

    async def features(self, request: AdFraudRequest, ref: ModelRef) -> Features:
        return Features(fz.to_matrix([fz.ad_fraud_row(request.__dict__)]))

    def respond(
        self, request: AdFraudRequest, features: Features, answer: Answer, started: float
    ) -> AdFraudResponse:
        score = float(answer.scores[0])
        return AdFraudResponse(
            user_id=request.user_id,
            fraud_probability=round(score, 6),
            is_fraud=score >= 0.5,
            risk_level=risk_band(score)[0],
            model_version=answer.ref.version,
            latency_ms=_ms_since(started),
        )


class CtrPipeline(Pipeline[CtrRequest, CtrResponse]):
    family = "ctr_prediction"

    def entity(self, request: CtrRequest) -> str | None:
        return request.placement_id

    async def features(self, request: CtrRequest, ref: ModelRef) -> Features:
        return Features(fz.to_matrix([fz.ctr_row(request.__dict__)]))

    def respond(
        self, request: CtrRequest, features: Features, answer: Answer, started: float
    ) -> CtrResponse:
        return CtrResponse(
            placement_id=request.placement_id,
            predicted_ctr=round(float(answer.scores[0]), 6),
            model_version=answer.ref.version,
            latency_ms=_ms_since(started),
        )


class BidPipeline(Pipeline[BidRequest, BidResponse]):
    family = "bid_optimization"

    def entity(self, request: BidRequest) -> str | None:
        return request.placement_id

    async def features(self, request: BidRequest, ref: ModelRef) -> Features:
        return Features(fz.to_matrix([fz.bid_row(request.__dict__)]))

    def respond(
        self, request: BidRequest, features: Features, answer: Answer, started: float
    ) -> BidResponse:
        optimal = float(answer.scores[0])
        bid = max(optimal, request.floor_cpm)
        affordable = request.budget_remaining >= bid / 1000  # one impression at this CPM
        if not affordable:
            reason = "budget_remaining cannot pay for one impression at the floor"
        elif optimal < request.floor_cpm:
            reason = "model value is below the floor; bidding the floor"
        else:
            reason = "model value clears the floor"
        return BidResponse(
            placement_id=request.placement_id,
            recommended_bid_cpm=round(bid, 4),
            floor_cpm=request.floor_cpm,
            should_bid=affordable,
            reason=reason,
            model_version=answer.ref.version,
            latency_ms=_ms_since(started),
        )

    def recorded(self, answer: Answer) -> np.ndarray | None:
        return None  # a bid in CPM is not a score


# --- seed 001 ---------------------------------------------------------------------------------


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
        """Seed 001's freshness SLA as a metric: the age of each row's oldest record."""
        ages = [age for age in self.freshness if age is not None]
        if ages:
            observe_many(of_version(model, version).feature_age, np.asarray(ages))

    def status(self, row: int) -> dict[str, Any]:
        if not self.missing[row]:
            return self._clean
        used = [d for c in self.columns if (d := c.defaults_used(row)) is not None]
        return {**self._clean, "defaults_used": used}


Rows = list[dict[str, Any]]
"""A batch's answers as plain dicts, encoded once by the caller."""


class CardFraudPipeline(Pipeline[Sequence[CardFraudRequest], Rows]):
    family = "card_fraud"
    explain = True

    def entity(self, request: Sequence[CardFraudRequest]) -> str | None:
        return request[0].card_id

    async def features(self, request: Sequence[CardFraudRequest], ref: ModelRef) -> Features:
        entities = await self.fetch(
            ref,
            {"card": [r.card_id for r in request], "merchant": [r.merchant_id for r in request]},
        )
        cards, merchants = entities["card"], entities["merchant"]
        rows = fz.card_fraud_matrix(
            [r.transaction_amount for r in request],
            [r.mcc_code for r in request],
            [r.country_code for r in request],
            cards.values,
            merchants.values,
        )
        return Features(rows, (cards, merchants))

    def respond(
        self,
        request: Sequence[CardFraudRequest],
        features: Features,
        answer: Answer,
        started: float,
    ) -> Rows:
        assert answer.contributions is not None  # asked for, so always an array
        factors = CARD_FACTORS.top(answer.contributions)
        report = EntityReport(self.store.backend, features.context, time.time())
        report.observe(answer.ref.name, answer.ref.version)
        rounded = answer.scores.astype(np.float64).round(6).tolist()
        latency = _ms_since(started)
        version = answer.ref.version
        results = []
        for i, r in enumerate(request):
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
                    "model_version": version,
                    "feature_freshness_sec": report.freshness[i],
                    "card_id": r.card_id,
                    "features": report.status(i),
                }
            )
        return results


class PersonalizationPipeline(Pipeline[Sequence[PersonalizationRequest], Rows]):
    family = "personalization"

    def entity(self, request: Sequence[PersonalizationRequest]) -> str | None:
        return request[0].user_id

    async def features(self, request: Sequence[PersonalizationRequest], ref: ModelRef) -> Features:
        entities = await self.fetch(
            ref,
            {
                "user": [r.user_id for r in request],
                "item": [r.item_id for r in request],
                "session": [r.session_id for r in request],
            },
        )
        users, items, sessions = entities["user"], entities["item"], entities["session"]
        rows = [
            fz.personalization_row(r.__dict__, users.values[i], items.values[i], sessions.values[i])
            for i, r in enumerate(request)
        ]
        return Features(fz.to_matrix(rows), (users, items, sessions, rows))

    def respond(
        self,
        request: Sequence[PersonalizationRequest],
        features: Features,
        answer: Answer,
        started: float,
    ) -> Rows:
        users, items, sessions, rows = features.context
        outputs = np.clip(answer.scores, 0.0, 1.0).astype(np.float64).round(6).tolist()
        report = EntityReport(self.store.backend, (users, items, sessions), time.time())
        report.observe(answer.ref.name, answer.ref.version)
        user_values, session_values = users.values.tolist(), sessions.values.tolist()
        latency = _ms_since(started)
        results = []
        for i, r in enumerate(request):
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
                    "model_version": answer.ref.version,
                    "user_id": r.user_id,
                    "item_id": r.item_id,
                    "feature_freshness_sec": report.freshness[i],
                    "features": report.status(i),
                }
            )
        return results

    def recorded(self, answer: Answer) -> np.ndarray | None:
        return np.clip(answer.scores, 0.0, 1.0)[:, 0]  # relevance


# --- seed 003 ---------------------------------------------------------------------------------


class GenericPipeline(Pipeline[GenericPredictRequest, dict[str, Any]]):
    """Seed 003's `/predict`. The answer is a plain dict (the shape of `GenericPredictResponse`):
    built once and encoded once, and `explanations` only when the request asked for them."""

    family = ""  # per request: `model_name`
    route_field = "model_name"

    def family_of(self, request: GenericPredictRequest) -> str:
        return request.model_name

    def entity(self, request: GenericPredictRequest) -> str | None:
        return request.correlation_id

    def pinned(self, request: GenericPredictRequest) -> str | None:
        return request.version

    def explains(self, request: GenericPredictRequest) -> bool:
        return request.explain

    async def features(self, request: GenericPredictRequest, ref: ModelRef) -> Features:
        if request.explain and explanation_method(ref.card) is None:
            raise InvalidInput(
                f"explain: {ref.name}:{ref.version} ({ref.card.framework}, {ref.card.task}) has "
                "no explainer; explanations need a binary or regression XGBoost or LightGBM model"
            )
        return Features(columns_to_matrix(request.features, ref.card.feature_names))

    def respond(
        self,
        request: GenericPredictRequest,
        features: Features,
        answer: Answer,
        started: float,
    ) -> dict[str, Any]:
        body = encode_outputs(answer.scores, answer.ref.card.task)
        body["correlation_id"] = request.correlation_id or str(uuid.uuid4())
        body["model_version"] = answer.ref.version
        body["latency_ms"] = _ms_since(started)
        if request.explain:
            body["explanations"] = explain_rows(answer).model_dump(mode="json")
        return body

    def recorded(self, answer: Answer) -> np.ndarray | None:
        return answer.scores if answer.ref.card.task == "binary" else None


FACTOR_GROUPS: dict[str, Mapping[str, Sequence[str]]] = {"card_fraud": fz.CARD_RISK_FACTORS}
"""Families whose features have named groups (seed 001's risk factors): explanations add the
groups' sums, matched by feature name (a version may order its features differently)."""


def explanation_method(card: ModelCard) -> Literal["path", "tree_shap"] | None:
    """How a version's contributions are computed, or None when it has no explainer: only a
    native tree model kept beside its ONNX artifact, and only where one contribution vector per
    row means something (binary, regression; a multiclass model has one per class)."""
    if card.task not in ("binary", "regression"):
        return None
    if "model.json" in card.checksums:
        return "path"
    if "model.txt" in card.checksums:
        return "tree_shap"
    return None


def explain_rows(answer: Answer) -> Explanations:
    """Per row: every feature's contribution by the card's names, largest first, and the base
    value that with them adds up to the raw output (read back through the link function, as
    the remote runner protocol carries the contributions without the bias column)."""
    card = answer.ref.card
    method = explanation_method(card)
    assert method is not None and answer.contributions is not None  # checked before predicting
    contributions = np.asarray(answer.contributions, dtype=np.float64)
    scores = answer.scores.astype(np.float64)
    if card.task == "binary":
        p = np.clip(scores, 1e-12, 1 - 1e-12)
        raw = np.log(p / (1 - p))
    else:
        raw = scores
    bases = (raw - contributions.sum(axis=1)).tolist()
    names = card.feature_names
    order = np.argsort(-np.abs(contributions), axis=1, kind="stable").tolist()
    values = contributions.tolist()
    groups = FACTOR_GROUPS.get(answer.ref.name)
    group_sums: list[dict[str, float] | None] = [None] * len(values)
    if groups is not None:
        ranking = FactorRanking(groups, names)
        totals = (contributions @ ranking.membership).tolist()
        group_sums = [
            {g: round(t, 6) for g, t in zip(ranking.names, row, strict=True)} for row in totals
        ]
    return Explanations(
        method=method,
        rows=[
            RowExplanation(
                base_value=round(base, 6),
                contributions=[
                    Contribution(feature=names[j], contribution=round(row[j], 6)) for j in ranked
                ],
                factor_groups=sums,
            )
            for base, row, ranked, sums in zip(bases, values, order, group_sums, strict=True)
        ],
    )


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
        # Rounded once (rounding keeps order, so the rounded maximum is the rounded confidence):
        # on the one-row requests that dominate, each numpy call costs more than its arithmetic.
        rounded = probs.round(6)
        return {
            "prediction": probs.argmax(axis=1).tolist(),
            "confidence": rounded.max(axis=1).tolist(),
            "probabilities": {f"class_{k}": column for k, column in enumerate(rounded.T.tolist())},
        }
    first = outputs if outputs.ndim == 1 else outputs[:, 0]
    return {"prediction": first.round(6).tolist(), "confidence": [], "probabilities": {}}


# --- seed 004 ---------------------------------------------------------------------------------


@dataclass
class V1Request:
    instances: list[list[float]]
    version: str | None = None


class V1Pipeline(Pipeline[V1Request, dict[str, Any]]):
    route_field = "version"

    def __init__(self, router: Router, store: FeatureStore, spans: Spans, model: str) -> None:
        super().__init__(router, store, spans)
        self.model = model

    def family_of(self, request: V1Request) -> str:
        return self.model

    def pinned(self, request: V1Request) -> str | None:
        return request.version

    async def features(self, request: V1Request, ref: ModelRef) -> Features:
        widths = {len(row) for row in request.instances}
        if widths != {ref.n_features}:
            raise InvalidInput(
                f"instances: every instance needs {ref.n_features} values "
                f"({', '.join(ref.card.feature_names)}); got lengths {sorted(widths)}"
            )
        return Features(fz.to_matrix(request.instances))

    def respond(
        self, request: V1Request, features: Features, answer: Answer, started: float
    ) -> dict[str, Any]:
        ref = answer.ref
        outputs = answer.scores.astype(np.float64)
        body: dict[str, Any] = {"model_name": ref.name, "model_version": ref.version}
        if ref.card.task in ("binary", "multiclass"):
            probs = outputs if outputs.ndim == 2 else np.column_stack([1 - outputs, outputs])
            labels = ref.card.output_names or [f"class_{k}" for k in range(probs.shape[1])]
            body["predictions"] = [labels[k] for k in probs.argmax(axis=1)]
            body["probabilities"] = probs.round(6).tolist()
        else:
            body["predictions"] = outputs.round(6).tolist()
        body["latency_ms"] = _ms_since(started)
        return body

    def recorded(self, answer: Answer) -> np.ndarray | None:
        return score_sample(answer.scores, answer.ref)


# --- any protocol that sends rows (Open Inference Protocol V2) ---------------------------------


@dataclass
class RowsRequest:
    model: str
    version: str | None
    rows: np.ndarray
    """Already in the feature order of `version` (or of the default version when None)."""


class RowsPipeline(Pipeline[RowsRequest, tuple[str, np.ndarray]]):
    """Rows in, (answering version, task-shaped outputs) out: the protocol encodes them."""

    def family_of(self, request: RowsRequest) -> str:
        return request.model

    def pinned(self, request: RowsRequest) -> str | None:
        return request.version

    async def features(self, request: RowsRequest, ref: ModelRef) -> Features:
        return Features(request.rows)

    def respond(
        self, request: RowsRequest, features: Features, answer: Answer, started: float
    ) -> tuple[str, np.ndarray]:
        return answer.ref.version, answer.scores

    def recorded(self, answer: Answer) -> np.ndarray | None:
        return score_sample(answer.scores, answer.ref)


# --- the endpoints ----------------------------------------------------------------------------


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


Explainer = Callable[[Mapping[str, Any]], Awaitable[tuple[FraudExplanation, str]]]
"""Writes `/score/fraud`'s `llm_explanation`: the LLM's in time, else the rule-based one."""


@dataclass(frozen=True)
class Reply:
    """A single-row answer: the seed's body exactly as documented, and response headers for
    what the body has no place for (where each entity's features came from)."""

    body: dict[str, Any]
    headers: dict[str, str]


# Where a single answer's features came from (the seed's body has no place for it).
SOURCE_HEADER = "X-Tiffin-Feature-Source"
DEGRADED_HEADER = "X-Tiffin-Feature-Degraded"
DEFAULTS_HEADER = "X-Tiffin-Feature-Defaults"
FRESHNESS_HEADER = "X-Tiffin-Feature-Freshness-Sec"


def _reply(row: dict[str, Any], extras: Sequence[str]) -> Reply:
    """A batch row as the single endpoint's reply: the keys a batch row adds so its rows can be
    told apart (`extras`) leave the body, the feature report moves to headers."""
    report = row.pop("features")
    for key in extras:
        del row[key]
    headers = {
        SOURCE_HEADER: report["source"],
        DEGRADED_HEADER: "true" if report["degraded"] else "false",
    }
    if report["defaults_used"]:
        headers[DEFAULTS_HEADER] = ",".join(report["defaults_used"])
    return Reply(row, headers)


class Scoring:
    """The scoring endpoints over the worker's pipelines: what a route handler calls."""

    def __init__(
        self,
        router: Router,
        store: FeatureStore,
        v1_model: str,
        explainer: Explainer,
        spans: Spans,
    ) -> None:
        self.ad_fraud = AdFraudPipeline(router, store, spans)
        self.ctr = CtrPipeline(router, store, spans)
        self.bid = BidPipeline(router, store, spans)
        self.card_fraud = CardFraudPipeline(router, store, spans)
        self.personalization = PersonalizationPipeline(router, store, spans)
        self.generic = GenericPipeline(router, store, spans)
        self.v1 = V1Pipeline(router, store, spans, v1_model)
        self.rows = RowsPipeline(router, store, spans)
        self.explainer = explainer

    async def score_fraud(self, request: CardFraudRequest) -> Reply:
        reply = _reply((await self.card_fraud([request]))[0], ("card_id",))
        response = reply.body
        if request.llm_explanation:
            context = {
                **request.model_dump(exclude={"llm_explanation"}),
                **{field: response[field] for field in _EXPLAINED_FIELDS},
            }
            written, source = await self.explainer(context)
            response["llm_explanation"] = written.model_dump(mode="json")
            response["llm_explanation_source"] = source
        return reply

    async def score_personalization(self, request: PersonalizationRequest) -> Reply:
        row = (await self.personalization([request]))[0]
        freshness = row["feature_freshness_sec"]
        reply = _reply(row, ("user_id", "item_id", "feature_freshness_sec"))
        if freshness is not None:  # seed 001 shows no freshness in this body
            reply.headers[FRESHNESS_HEADER] = str(freshness)
        return reply

    async def batch(
        self, model_type: str, requests: Sequence[Mapping[str, Any]], batch_id: str | None
    ) -> dict[str, Any]:
        started = time.perf_counter()
        results: Rows
        if model_type in FRAUD_FAMILIES:
            results = await self.card_fraud(_parse_items(_CARD_ITEMS, requests))
        else:
            results = await self.personalization(_parse_items(_PERSONALIZATION_ITEMS, requests))
        return {
            "batch_id": batch_id,
            "model_type": model_type,
            "count": len(results),
            "results": results,
            "model_version": results[0]["model_version"],
            "latency_ms": _ms_since(started),
        }

    async def predict_batch(
        self, requests: Sequence[GenericPredictRequest]
    ) -> list[dict[str, Any]]:
        return [await self.generic(r) for r in requests]
