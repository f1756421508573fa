"""Feature definitions shared by training and serving, so the two can never drift apart.

Each model family has a list of feature names (the model's column order) and a function turning one
request (a mapping of the request's fields) plus the entity records from the feature store into one
float32 row. Training pipelines call the same functions on generated requests.
"""

from __future__ import annotations

import ipaddress
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Vector = Sequence[float] | np.ndarray

# ---------------------------------------------------------------------------------------------
# Entities held in the online feature store
# ---------------------------------------------------------------------------------------------

COUNTRIES = ("US", "GB", "DE", "FR", "CA", "BR", "IN", "NG", "RU", "CN", "MX", "AU", "JP", "ES")
ITEM_CATEGORIES = (
    "electronics",
    "fashion",
    "home",
    "books",
    "sports",
    "beauty",
    "toys",
    "grocery",
)


@dataclass(frozen=True)
class EntitySchema:
    """The stored fields of one entity kind, in storage order, with their fallback values.

    Fallbacks are population medians of the generated history: a missing entity scores like an
    ordinary one rather than like an extreme one.
    """

    kind: str
    fields: tuple[str, ...]
    defaults: tuple[float, ...]

    def default_record(self) -> np.ndarray:
        return np.asarray(self.defaults, dtype=np.float32)

    def index(self, field: str) -> int:
        return self.fields.index(field)


CARD = EntitySchema(
    "card",
    (
        "txn_count_1h",
        "txn_count_24h",
        "amount_avg_30d",
        "amount_std_30d",
        "distinct_merchants_24h",
        "distinct_countries_7d",
        "card_age_days",
        "chargebacks_90d",
        "declines_24h",
        "night_txn_ratio_30d",
        "home_country",
    ),
    (0.0, 2.0, 60.0, 40.0, 2.0, 1.0, 700.0, 0.0, 0.0, 0.1, 0.0),
)
MERCHANT = EntitySchema(
    "merchant",
    ("merchant_fraud_rate_90d", "merchant_txn_count_30d"),
    (0.01, 500.0),
)
USER = EntitySchema(
    "user",
    (
        "sessions_7d",
        "avg_pages_per_session",
        "purchases_30d",
        "avg_order_value",
        "days_since_last_visit",
        "engagement_rate",
        *(f"affinity_{c}" for c in ITEM_CATEGORIES),
    ),
    (3.0, 4.0, 1.0, 60.0, 3.0, 0.3, *([1.0 / len(ITEM_CATEGORIES)] * len(ITEM_CATEGORIES))),
)
ITEM = EntitySchema(
    "item",
    ("item_price", "popularity_7d", "item_ctr_7d", "category"),
    (50.0, 100.0, 0.02, 0.0),
)
SESSION = EntitySchema(
    "session",
    ("pages_viewed", "session_duration_sec", "cart_adds"),
    (3.0, 120.0, 0.0),
)
ENTITIES: dict[str, EntitySchema] = {s.kind: s for s in (CARD, MERCHANT, USER, ITEM, SESSION)}

# ---------------------------------------------------------------------------------------------
# Small deterministic encoders
# ---------------------------------------------------------------------------------------------

_BOT_AGENT = re.compile(r"bot|crawl|spider|curl|python|wget|headless|phantom|scrapy", re.I)
_MOBILE_AGENT = re.compile(r"mobile|android|iphone|ipad", re.I)
# Address blocks the generator uses for hosting providers; real deployments swap in an ASN list.
DATACENTER_PREFIXES = ("34.", "35.", "52.", "54.", "104.", "185.")
HIGH_RISK_MCC = {"5816": 0.9, "7995": 1.0, "6051": 0.9, "4829": 0.8, "5967": 0.7, "5993": 0.4}
AD_FORMATS = ("banner", "video", "native", "interstitial")
USER_SEGMENTS = ("sports", "tech", "news", "finance", "travel", "gaming", "fashion", "auto")
COMPETITION_LEVELS = ("low", "medium", "high")


def stable_bucket(value: str, buckets: int) -> int:
    """A hash bucket that is the same in every process (Python's hash() is salted)."""
    return zlib.crc32(value.encode()) % buckets


def country_index(code: str | None) -> int:
    if code is None:
        return -1
    try:
        return COUNTRIES.index(code.upper())
    except ValueError:
        return len(COUNTRIES)  # any other country


def category_index(category: str | None) -> int:
    if category is None:
        return -1
    try:
        return ITEM_CATEGORIES.index(category.lower())
    except ValueError:
        return -1


# ---------------------------------------------------------------------------------------------
# Seed 000: ad click fraud, CTR, bid optimisation (request fields only)
# ---------------------------------------------------------------------------------------------

AD_FRAUD_FEATURES = (
    "log_impressions_24h",
    "log_clicks_24h",
    "ctr_24h",
    "ip_is_private",
    "ip_is_datacenter",
    "ua_is_bot",
    "ua_is_mobile",
    "ua_length",
    "ua_missing",
)


def ad_fraud_row(req: Mapping[str, Any]) -> list[float]:
    impressions = float(req["impressions_24h"])
    clicks = float(req["clicks_24h"])
    ip = str(req["ip_address"])
    agent = str(req.get("user_agent") or "")
    return [
        math.log1p(impressions),
        math.log1p(clicks),
        clicks / max(impressions, 1.0),
        float(ipaddress.ip_address(ip).is_private),
        float(ip.startswith(DATACENTER_PREFIXES)),
        float(bool(_BOT_AGENT.search(agent))),
        float(bool(_MOBILE_AGENT.search(agent))),
        float(len(agent)),
        float(not agent),
    ]


CTR_FEATURES = (
    "placement_bucket",
    *(f"format_{f}" for f in AD_FORMATS),
    *(f"segment_{s}" for s in USER_SEGMENTS),
    "segment_count",
    "hour_sin",
    "hour_cos",
    "day_of_week",
    "is_weekend",
)


def ctr_row(req: Mapping[str, Any]) -> list[float]:
    segments = {s.lower() for s in req.get("user_segments") or ()}
    hour = int(req["time_of_day"])
    day = int(req["day_of_week"])
    return [
        float(stable_bucket(str(req["placement_id"]), 64)),
        *(float(req["ad_format"] == f) for f in AD_FORMATS),
        *(float(s in segments) for s in USER_SEGMENTS),
        float(len(segments & set(USER_SEGMENTS))),
        math.sin(2 * math.pi * hour / 24),
        math.cos(2 * math.pi * hour / 24),
        float(day),
        float(day >= 5),
    ]


BID_FEATURES = (
    "floor_cpm",
    "predicted_ctr",
    "competition",
    "log_budget_remaining",
    "placement_bucket",
)


def bid_row(req: Mapping[str, Any]) -> list[float]:
    return [
        float(req["floor_cpm"]),
        float(req["predicted_ctr"]),
        float(COMPETITION_LEVELS.index(req["competition_level"])),
        math.log1p(float(req["budget_remaining"])),
        float(stable_bucket(str(req["placement_id"]), 64)),
    ]


# ---------------------------------------------------------------------------------------------
# Seed 001: card fraud and personalisation (request fields + feature store records)
# ---------------------------------------------------------------------------------------------

CARD_FRAUD_FEATURES = (
    "transaction_amount",
    "amount_zscore",
    "amount_to_avg_ratio",
    "mcc_risk",
    "is_foreign_country",
    "merchant_fraud_rate_90d",
    *CARD.fields[:-1],  # home_country is used through is_foreign_country only
)

# Named groups of features, reported as `top_risk_factors` from per-prediction contributions.
CARD_RISK_FACTORS: dict[str, tuple[str, ...]] = {
    "velocity_check": ("txn_count_1h", "txn_count_24h", "declines_24h", "distinct_merchants_24h"),
    "geo_pattern": ("is_foreign_country", "distinct_countries_7d"),
    "amount_anomaly": (
        "transaction_amount",
        "amount_zscore",
        "amount_to_avg_ratio",
        "amount_avg_30d",
        "amount_std_30d",
    ),
    "merchant_risk": ("mcc_risk", "merchant_fraud_rate_90d"),
    "account_history": ("card_age_days", "chargebacks_90d", "night_txn_ratio_30d"),
}


def card_fraud_matrix(
    amounts: Sequence[float],
    mcc_codes: Sequence[str | None],
    country_codes: Sequence[str | None],
    cards: np.ndarray,
    merchants: np.ndarray,
) -> np.ndarray:
    """(rows, CARD_FRAUD_FEATURES) for many transactions: request columns plus each row's card
    and merchant records. Arithmetic in float64, as Python floats would, then stored as float32."""
    amount = np.asarray(amounts, dtype=np.float64)
    cards = np.asarray(cards, dtype=np.float32).reshape(len(amount), len(CARD.fields))
    avg = cards[:, 2].astype(np.float64)
    home = cards[:, CARD.index("home_country")].astype(np.int64).tolist()
    x = np.empty((len(amount), len(CARD_FRAUD_FEATURES)), dtype=np.float32)
    x[:, 0] = amount
    x[:, 1] = (amount - avg) / np.maximum(cards[:, 3].astype(np.float64), 1.0)
    x[:, 2] = amount / np.maximum(avg, 1.0)
    x[:, 3] = [HIGH_RISK_MCC.get(str(code or ""), 0.1) for code in mcc_codes]
    x[:, 4] = [
        code is not None and country_index(code) != h
        for code, h in zip(country_codes, home, strict=True)
    ]
    x[:, 5] = np.asarray(merchants, dtype=np.float32).reshape(len(amount), -1)[:, 0]
    x[:, 6:] = cards[:, :-1]
    return x


def card_fraud_row(req: Mapping[str, Any], card: Vector, merchant: Vector) -> list[float]:
    """One transaction's row; the same arithmetic as `card_fraud_matrix`, which serving uses."""
    return card_fraud_matrix(
        [float(req["transaction_amount"])],
        [req.get("mcc_code")],
        [req.get("country_code")],
        np.asarray(card),
        np.asarray(merchant),
    )[0].tolist()


PERSONALIZATION_FEATURES = (
    *USER.fields[:6],  # the user's activity aggregates, as stored
    "category_affinity",
    "item_price",
    "price_to_aov_ratio",
    "item_popularity_7d",
    "item_ctr_7d",
    "session_pages",
)
PERSONALIZATION_OUTPUTS = ("relevance_score", "conversion_probability", "engagement_score")


def personalization_row(
    req: Mapping[str, Any],
    user: Vector,
    item: Vector,
    session: Vector,
) -> list[float]:
    category = category_index(req.get("item_category"))
    if category < 0:
        category = int(item[ITEM.index("category")])
    price = req.get("item_price")
    price = float(item[0]) if price is None else float(price)
    affinity = float(user[6 + category]) if 0 <= category < len(ITEM_CATEGORIES) else 0.0
    return [
        *(float(v) for v in user[:6]),
        affinity,
        price,
        price / max(float(user[3]), 1.0),
        float(item[1]),
        float(item[2]),
        float(session[0]),
    ]


def to_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
