"""A seed-style service, written the way seeds 000/001 describe theirs, as the 'before' peer.

FastAPI + pydantic request/response models per request, a synchronous redis-py client (one `MGET`
of the same packed records Tiffin reads), native XGBoost per request (`inplace_predict` for the
score, a `DMatrix` + `pred_contribs=True, approx_contribs=True` for the model-explained
`top_risk_factors` seed 001 shows: the same path attribution Tiffin computes, so every system
returns the same factors), a Prometheus counter and histogram per
request, served by uvicorn with the seeds' 2 workers:

    BENCH_CARD_FRAUD_DIR=... BENCH_AD_FRAUD_DIR=... REDIS_URL=... \
        uvicorn bench.baselines.seed_style:app --workers 2 --port 8001

Nothing here is tuned: handlers are plain `def` (FastAPI runs them in its thread pool, the usual
way to call a sync client), XGBoost keeps its default thread settings.
"""

from __future__ import annotations

import os
import time
from typing import Literal

import numpy as np
import redis
import xgboost as xgb
from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, Field

from bench.baselines import common
from tiffin import featurize as fz
from tiffin.feature_store import unpack

app = FastAPI(title="seed-style inference service")
REQUESTS = Counter("inference_requests_total", "Requests", ["endpoint", "status"])
LATENCY = Histogram("inference_request_duration_seconds", "Latency", ["endpoint"])

_card_dir = common.model_dir()
card_booster = xgb.Booster()
card_booster.load_model(str(_card_dir / "model.json"))
CARD_VERSION = common.model_version(_card_dir)
_ad_dir = common.model_dir("BENCH_AD_FRAUD_DIR")
ad_booster = xgb.Booster()
ad_booster.load_model(str(_ad_dir / "model.json"))
AD_VERSION = common.model_version(_ad_dir)
redis_client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=0.5)


class FraudRequest(BaseModel):
    card_id: str = Field(min_length=1, max_length=128)
    transaction_amount: float = Field(gt=0)
    merchant_id: str | None = None
    mcc_code: str | None = None
    country_code: str | None = None


class FeatureInfo(BaseModel):
    source: str
    defaults_used: list[str]
    degraded: bool


class FraudResponse(BaseModel):
    fraud_score: float
    risk_level: str
    confidence: float
    recommended_action: str
    explanation: str
    top_risk_factors: list[str]
    features_used: int
    latency_ms: float
    model_version: str
    feature_freshness_sec: int | None
    card_id: str
    features: FeatureInfo


class AdFraudRequest(BaseModel):
    user_id: str
    ip_address: str
    user_agent: str = ""
    impressions_24h: int = Field(ge=0)
    clicks_24h: int = Field(ge=0)


class AdFraudResponse(BaseModel):
    user_id: str
    fraud_probability: float
    is_fraud: bool
    risk_level: Literal["low", "medium", "high"]
    model_version: str
    latency_ms: float


def _lookup(
    blob: bytes | None, n_fields: int, default: np.ndarray
) -> tuple[np.ndarray, float | None]:
    decoded = unpack(blob, n_fields) if blob is not None else None
    return (default, None) if decoded is None else decoded


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/score/fraud", response_model=FraudResponse)
def score_fraud(req: FraudRequest) -> FraudResponse:
    started = time.perf_counter()
    keys = [f"features:card:{req.card_id}"]
    if req.merchant_id:
        keys.append(f"features:merchant:{req.merchant_id}")
    blobs: list[bytes | None] = redis_client.mget(keys)  # type: ignore[assignment]
    card, card_at = _lookup(blobs[0], common.CARD_FIELDS, common.CARD_DEFAULT)
    merchant, merchant_at = _lookup(
        blobs[1] if len(blobs) > 1 else None, common.MERCHANT_FIELDS, common.MERCHANT_DEFAULT
    )
    row = fz.card_fraud_row(req.model_dump(), card, merchant)
    x = np.asarray([row], dtype=np.float32)
    score = float(card_booster.inplace_predict(x)[0])
    contributions = card_booster.predict(xgb.DMatrix(x), pred_contribs=True, approx_contribs=True)[
        :, :-1
    ]
    factors = common.top_factors_matrix(contributions)[0]
    level, action = common.risk_band(score)
    now = time.time()
    ages = [now - t for t in (card_at, merchant_at) if t is not None]
    defaults = [f"card:{req.card_id}"] if card_at is None else []
    if req.merchant_id and merchant_at is None:
        defaults.append(f"merchant:{req.merchant_id}")
    response = FraudResponse(
        fraud_score=round(score, 6),
        risk_level=level,
        confidence=round(max(score, 1 - score), 6),
        recommended_action=action,
        explanation=common.explain(level, factors),
        top_risk_factors=factors,
        features_used=common.N_FEATURES,
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
        model_version=CARD_VERSION,
        feature_freshness_sec=round(max(ages)) if ages else None,
        card_id=req.card_id,
        features=FeatureInfo(source="redis", defaults_used=defaults, degraded=False),
    )
    REQUESTS.labels("/score/fraud", "success").inc()
    LATENCY.labels("/score/fraud").observe(time.perf_counter() - started)
    return response


@app.post("/predict/fraud", response_model=AdFraudResponse)
def predict_fraud(req: AdFraudRequest) -> AdFraudResponse:
    started = time.perf_counter()
    x = np.asarray([fz.ad_fraud_row(req.model_dump())], dtype=np.float32)
    score = float(ad_booster.inplace_predict(x)[0])
    level, _ = common.risk_band(score)
    REQUESTS.labels("/predict/fraud", "success").inc()
    LATENCY.labels("/predict/fraud").observe(time.perf_counter() - started)
    return AdFraudResponse(
        user_id=req.user_id,
        fraud_probability=round(score, 6),
        is_fraud=score >= 0.5,
        risk_level=level,
        model_version=AD_VERSION,
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
    )
