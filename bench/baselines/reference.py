"""The hand-tuned reference: what a careful Python service does on this box, as a ceiling.

Starlette routes with hand-written validation, orjson in and out, ONNX Runtime (one thread) for
scores, `redis.asyncio` with hiredis (one `MGET` per request or batch), uvicorn with uvloop and
httptools, two workers, no access log:

    BENCH_CARD_FRAUD_DIR=... REDIS_URL=... uvicorn bench.baselines.reference:app --workers 2 \
        --loop uvloop --http httptools --no-access-log --port 8002

It does the same model work as Tiffin and answers the same fields: `top_risk_factors` come from
path attribution (`common.PathAttribution`, equal to XGBoost's `approx_contribs`, as Tiffin's
`tiffin.attribution`), so a ratio against it measures serving overhead, not a different
algorithm. `BENCH_REFERENCE_CONTRIBS=treeshap` switches to exact TreeSHAP through the native
booster (~1.3 ms a row) for comparison.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import orjson
import redis.asyncio as aioredis
import xgboost as xgb
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.baselines import common
from tiffin import featurize as fz
from tiffin.feature_store import unpack

_dir = common.model_dir()
VERSION = common.model_version(_dir)
_options = ort.SessionOptions()
_options.intra_op_num_threads = 1
_options.inter_op_num_threads = 1
SESSION = ort.InferenceSession(
    str(_dir / "model.onnx"), sess_options=_options, providers=["CPUExecutionProvider"]
)
INPUT = SESSION.get_inputs()[0].name
OUTPUT = "probabilities"
BOOSTER = xgb.Booster()
BOOSTER.load_model(str(_dir / "model.json"))
BOOSTER.set_param({"nthread": 1})
CONTRIBS = os.environ.get("BENCH_REFERENCE_CONTRIBS", "path")
PATH = common.PathAttribution(_dir / "model.json") if CONTRIBS == "path" else None
# A blocking pool: past 64 in-flight lookups a request waits for a connection instead of failing.
REDIS = aioredis.Redis(
    connection_pool=aioredis.BlockingConnectionPool.from_url(
        os.environ["REDIS_URL"], max_connections=64, timeout=5
    )
)
FEATURE_INDEX = {name: i for i, name in enumerate(common.FEATURE_NAMES)}


def contributions(x: np.ndarray) -> np.ndarray:
    if PATH is not None:
        return PATH.contributions(x)
    return BOOSTER.predict(xgb.DMatrix(x, nthread=1), pred_contribs=True)[:, :-1]


def scores(x: np.ndarray) -> np.ndarray:
    return SESSION.run([OUTPUT], {INPUT: x})[0][:, 1]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def bad(message: str) -> Response:
    return json_response({"error": message}, 422)


def _item(raw: Any) -> dict[str, Any] | str:
    """Validated `/score/fraud` item, or the error message."""
    if not isinstance(raw, dict):
        return "body must be an object"
    card = raw.get("card_id")
    amount = raw.get("transaction_amount")
    if not isinstance(card, str) or not card:
        return "card_id: required string"
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
        return "transaction_amount: must be a number > 0"
    merchant = raw.get("merchant_id")
    if merchant is not None and not isinstance(merchant, str):
        return "merchant_id: must be a string"
    return raw


async def _score(items: list[dict[str, Any]], started: float) -> list[dict[str, Any]]:
    keys: list[str] = []
    for it in items:
        keys.append(f"features:card:{it['card_id']}")
        if it.get("merchant_id"):
            keys.append(f"features:merchant:{it['merchant_id']}")
    blobs = cast(Iterator[bytes | None], iter(await REDIS.mget(keys)))
    rows, meta = [], []
    for it in items:
        card_blob = next(blobs)
        merchant_blob = next(blobs) if it.get("merchant_id") else None
        card = unpack(card_blob, common.CARD_FIELDS) if card_blob is not None else None
        merchant = (
            unpack(merchant_blob, common.MERCHANT_FIELDS) if merchant_blob is not None else None
        )
        rows.append(
            fz.card_fraud_row(
                it,
                common.CARD_DEFAULT if card is None else card[0],
                common.MERCHANT_DEFAULT if merchant is None else merchant[0],
            )
        )
        meta.append((card, merchant))
    x = np.asarray(rows, dtype=np.float32)
    p = scores(x)
    factors = common.top_factors_matrix(contributions(x))
    now = time.time()
    latency = round((time.perf_counter() - started) * 1000, 3)
    out = []
    for it, score, top, (card, merchant) in zip(items, p.tolist(), factors, meta, strict=True):
        level, action = common.risk_band(score)
        ages = [now - rec[1] for rec in (card, merchant) if rec is not None]
        defaults = [] if card is not None else [f"card:{it['card_id']}"]
        if it.get("merchant_id") and merchant is None:
            defaults.append(f"merchant:{it['merchant_id']}")
        out.append(
            {
                "fraud_score": round(score, 6),
                "risk_level": level,
                "confidence": round(max(score, 1 - score), 6),
                "recommended_action": action,
                "explanation": common.explain(level, top),
                "top_risk_factors": top,
                "features_used": common.N_FEATURES,
                "latency_ms": latency,
                "model_version": VERSION,
                "feature_freshness_sec": round(max(ages)) if ages else None,
                "card_id": it["card_id"],
                "features": {"source": "redis", "defaults_used": defaults, "degraded": False},
            }
        )
    return out


async def score_fraud(request: Request) -> Response:
    started = time.perf_counter()
    try:
        item = _item(orjson.loads(await request.body()))
    except orjson.JSONDecodeError:
        return bad("body is not JSON")
    if isinstance(item, str):
        return bad(item)
    return json_response((await _score([item], started))[0])


async def score_batch(request: Request) -> Response:
    started = time.perf_counter()
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return bad("body is not JSON")
    raw = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(raw, list) or not 1 <= len(raw) <= 1024:
        return bad("requests: 1 to 1024 items")
    items = []
    for i, r in enumerate(raw):
        item = _item(r)
        if isinstance(item, str):
            return bad(f"requests[{i}].{item}")
        items.append(item)
    results = await _score(items, started)
    return json_response(
        {
            "batch_id": body.get("batch_id"),
            "model_type": body.get("model_type"),
            "count": len(results),
            "results": results,
            "model_version": VERSION,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )


async def predict(request: Request) -> Response:
    """Seed 003's generic `/predict` for the card_fraud model (column-oriented features)."""
    started = time.perf_counter()
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return bad("body is not JSON")
    if not isinstance(body, dict) or body.get("model_name") != "card_fraud":
        return json_response({"error": "model_name: only card_fraud is served here"}, 404)
    columns = body.get("features")
    if not isinstance(columns, dict) or set(columns) != set(FEATURE_INDEX):
        return bad("features: must name exactly the model's features")
    try:
        x = np.asarray([columns[f] for f in common.FEATURE_NAMES], dtype=np.float32).T.copy()
    except (TypeError, ValueError):
        return bad("features: every feature needs the same number of numbers")
    p = scores(x).astype(np.float64)
    return json_response(
        {
            "prediction": (p >= 0.5).astype(int).tolist(),
            "confidence": np.round(np.maximum(p, 1 - p), 6).tolist(),
            "probabilities": {
                "class_0": np.round(1 - p, 6).tolist(),
                "class_1": np.round(p, 6).tolist(),
            },
            "correlation_id": body.get("correlation_id") or str(uuid.uuid4()),
            "model_name": "card_fraud",
            "model_version": VERSION,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )


async def health(_: Request) -> Response:
    return json_response({"status": "ok"})


app = Starlette(
    routes=[
        Route("/score/fraud", score_fraud, methods=["POST"]),
        Route("/score/batch", score_batch, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/health", health),
    ]
)
