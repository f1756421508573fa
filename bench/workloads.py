"""The workloads: one logical request stream per endpoint, encoded for each system's API.

Bodies are generated once from a fixed seed (cards, merchants and feature rows that exist in the
seeded Redis and the training distribution) and cycled through during a step, so every system sees
the same requests in the same order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson

from tiffin.featurize import CARD_FRAUD_FEATURES

N_BODIES = 2048
SEED = 3


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    slo_p99_ms: float
    start_rps: float
    rows_per_request: int = 1
    # system -> (path, body generator)
    routes: dict[str, tuple[str, Callable[[random.Random], bytes]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "tiffin" in self.routes:  # every runner topology serves the same routes
            self.routes.setdefault("tiffin_separate", self.routes["tiffin"])
            self.routes.setdefault("tiffin_baseline", self.routes["tiffin"])


def _card_request(rng: random.Random) -> dict[str, object]:
    return {
        "card_id": f"card_{rng.randrange(10_000):08d}",
        "transaction_amount": round(rng.lognormvariate(4, 1), 2),
        "merchant_id": f"merchant_{rng.randrange(20_000):05d}",
        "mcc_code": rng.choice(["5411", "5812", "5999", "4111", "5816", "7995"]),
        "country_code": rng.choice(["US", "US", "US", "GB", "DE", "NG"]),
    }


def score_fraud_body(rng: random.Random) -> bytes:
    return orjson.dumps(_card_request(rng))


def score_batch_body(rng: random.Random, rows: int = 256) -> bytes:
    return orjson.dumps(
        {
            "model_type": "fraud_detection",
            "requests": [_card_request(rng) for _ in range(rows)],
            "batch_id": f"bench_{rng.randrange(10**9)}",
        }
    )


def predict_fraud_body(rng: random.Random) -> bytes:
    impressions = rng.randrange(1, 20_000)
    return orjson.dumps(
        {
            "user_id": f"user_{rng.randrange(10**6)}",
            "ip_address": rng.choice(["52.1.2.3", "192.168.1.1", "81.2.69.142", "104.16.0.7"]),
            "user_agent": rng.choice(
                ["Mozilla/5.0 (iPhone; CPU iPhone OS 17_5) Mobile/15E148", "curl/8.5.0"]
            ),
            "impressions_24h": impressions,
            "clicks_24h": rng.randrange(0, max(impressions // 20, 1)),
        }
    )


_ROWS: np.ndarray | None = None


def _feature_row(rng: random.Random) -> list[float]:
    global _ROWS
    if _ROWS is None:
        from models.datagen import card_fraud_dataset

        _ROWS, _ = card_fraud_dataset(np.random.default_rng(SEED), 4000)
    return [round(float(v), 4) for v in _ROWS[rng.randrange(len(_ROWS))]]


def generic_body(rng: random.Random) -> bytes:
    row = _feature_row(rng)
    return orjson.dumps(
        {
            "model_name": "card_fraud",
            "features": {name: [v] for name, v in zip(CARD_FRAUD_FEATURES, row, strict=True)},
        }
    )


def mlserver_body(rng: random.Random) -> bytes:
    """The same row in the Open Inference (V2) protocol.

    The store's model.json is a plain Booster (no scikit-learn metadata), so mlserver-xgboost loads
    it as an `XGBRegressor`, whose default `predict` output is already the `binary:logistic`
    probability: the same number Tiffin returns.
    """
    row = _feature_row(rng)
    return orjson.dumps(
        {
            "inputs": [
                {"name": "input-0", "shape": [1, len(row)], "datatype": "FP32", "data": row}
            ],
        }
    )


def v1_body(rng: random.Random) -> bytes:
    return orjson.dumps(
        {
            "instances": [
                [
                    round(rng.uniform(4.3, 7.9), 1),
                    round(rng.uniform(2.0, 4.4), 1),
                    round(rng.uniform(1.0, 6.9), 1),
                    round(rng.uniform(0.1, 2.5), 1),
                ]
            ]
        }
    )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "score_fraud",
            "/score/fraud (Redis features + model + contributions)",
            25.0,
            200,
            routes={
                "tiffin": ("/score/fraud", score_fraud_body),
                "seed": ("/score/fraud", score_fraud_body),
                "reference": ("/score/fraud", score_fraud_body),
            },
        ),
        Workload(
            "predict_generic",
            "generic predict, card_fraud, 1 row",
            25.0,
            200,
            routes={
                "tiffin": ("/predict", generic_body),
                "mlserver": ("/v2/models/card_fraud/infer", mlserver_body),
                "reference": ("/predict", generic_body),
            },
        ),
        Workload(
            "predict_fraud",
            "/predict/fraud (seed 000, request features)",
            25.0,
            200,
            routes={
                "tiffin": ("/predict/fraud", predict_fraud_body),
                "seed": ("/predict/fraud", predict_fraud_body),
            },
        ),
        Workload(
            "score_batch",
            "/score/batch, 256 rows",
            250.0,
            8,
            rows_per_request=256,
            routes={
                "tiffin": ("/score/batch", score_batch_body),
                "reference": ("/score/batch", score_batch_body),
            },
        ),
        Workload(
            "v1_predict",
            "/v1/models/predict (seed 004, species v1)",
            25.0,
            200,
            routes={"tiffin": ("/v1/models/predict", v1_body)},
        ),
    )
}


def bodies(workload: Workload, system: str, n: int = N_BODIES) -> tuple[str, list[bytes]]:
    path, make = workload.routes[system]
    rng = random.Random(SEED)
    count = min(n, 64) if workload.rows_per_request > 1 else n
    return path, [make(rng) for _ in range(count)]
