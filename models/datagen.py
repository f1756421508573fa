"""Generated but realistic data: entity histories for the feature store and labelled requests.

Everything is drawn from one `numpy.random.Generator`, so a seed reproduces the data exactly.
Class balance mirrors production: ~2-4% fraud, ~2% clicks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiffin import featurize as fz


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# Entity populations (what the feature store holds)
# ---------------------------------------------------------------------------------------------


@dataclass
class CardPopulation:
    records: np.ndarray  # (n, len(CARD.fields)) float32, CARD.fields order
    compromised: np.ndarray  # (n,) bool: cards in the hands of fraudsters


def card_population(rng: np.random.Generator, n: int) -> CardPopulation:
    compromised = rng.random(n) < 0.04
    velocity = np.where(compromised, 3.0, 1.0)
    txn_24h = rng.poisson(2.0 * velocity)
    avg = rng.lognormal(np.log(55.0), 0.6, n)
    home = rng.choice(len(fz.COUNTRIES), n, p=_country_weights())
    records = np.column_stack(
        [
            rng.poisson(0.2 * velocity * velocity),  # txn_count_1h
            txn_24h,
            avg,
            avg * rng.uniform(0.3, 0.9, n),  # amount_std_30d
            np.minimum(rng.poisson(1.5 * velocity), np.maximum(txn_24h, 1)),
            1 + rng.poisson(np.where(compromised, 1.2, 0.1)),  # distinct_countries_7d
            rng.exponential(700.0, n) * np.where(compromised, 0.5, 1.0) + 1,
            rng.poisson(np.where(compromised, 0.3, 0.02)),  # chargebacks_90d
            rng.poisson(np.where(compromised, 1.0, 0.1)),  # declines_24h
            rng.beta(np.where(compromised, 3, 1), 8),  # night_txn_ratio_30d
            home,
        ]
    ).astype(np.float32)
    return CardPopulation(records, compromised)


def _country_weights() -> np.ndarray:
    w = np.array([40, 10, 8, 7, 6, 5, 5, 2, 2, 3, 4, 4, 2, 2], dtype=float)
    return w / w.sum()


def merchant_population(rng: np.random.Generator, n: int) -> np.ndarray:
    risky = rng.random(n) < 0.05
    fraud_rate = np.where(risky, rng.beta(4, 40, n), rng.beta(1, 150, n))
    return np.column_stack([fraud_rate, rng.lognormal(6.0, 1.0, n)]).astype(np.float32)


def user_population(rng: np.random.Generator, n: int) -> np.ndarray:
    engaged = rng.random(n)
    affinity = rng.dirichlet(np.full(len(fz.ITEM_CATEGORIES), 0.6), n)
    return np.column_stack(
        [
            rng.poisson(1 + 8 * engaged),  # sessions_7d
            1 + rng.gamma(2.0, 1.0 + 3 * engaged),  # avg_pages_per_session
            rng.poisson(0.2 + 3 * engaged**2),  # purchases_30d
            rng.lognormal(np.log(60), 0.7, n),  # avg_order_value
            rng.exponential(10 * (1.1 - engaged)),  # days_since_last_visit
            np.clip(engaged + rng.normal(0, 0.1, n), 0, 1),  # engagement_rate
            affinity,
        ]
    ).astype(np.float32)


def item_population(rng: np.random.Generator, n_per_category: int) -> tuple[list[str], np.ndarray]:
    ids, rows = [], []
    for c_index, category in enumerate(fz.ITEM_CATEGORIES):
        base_price = {"electronics": 250, "fashion": 60, "home": 80, "books": 15}.get(category, 35)
        for i in range(n_per_category):
            ids.append(f"item_{category}_{i:03d}")
            rows.append(
                [
                    rng.lognormal(np.log(base_price), 0.5),
                    rng.lognormal(4.5, 1.0),
                    rng.beta(2, 80),
                    c_index,
                ]
            )
    return ids, np.asarray(rows, dtype=np.float32)


def session_population(rng: np.random.Generator, n: int) -> np.ndarray:
    pages = 1 + rng.poisson(3.0, n)
    return np.column_stack(
        [pages, pages * rng.gamma(2.0, 30.0, n), rng.poisson(0.3 * pages / 3)]
    ).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Labelled requests (training sets); each returns (feature matrix, target)
# ---------------------------------------------------------------------------------------------


def card_fraud_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    cards = card_population(rng, max(n // 4, 1000))
    merchants = merchant_population(rng, 2000)
    card_ix = rng.integers(0, len(cards.records), n)
    merchant_ix = rng.integers(0, len(merchants), n)
    mcc_codes = np.array(["5411", "5812", "5999", "4111", *fz.HIGH_RISK_MCC])
    rows, labels = [], []
    for ci, mi in zip(card_ix, merchant_ix, strict=True):
        card = cards.records[ci]
        comp = bool(cards.compromised[ci])
        amount = float(rng.lognormal(np.log(card[2]), 0.5) * (rng.uniform(2, 6) if comp else 1))
        mcc = str(rng.choice(mcc_codes[4:] if comp and rng.random() < 0.5 else mcc_codes))
        home = int(card[-1])
        foreign = rng.random() < (0.5 if comp else 0.05)
        country = fz.COUNTRIES[(home + 1) % len(fz.COUNTRIES)] if foreign else fz.COUNTRIES[home]
        req = {"transaction_amount": round(amount, 2), "mcc_code": mcc, "country_code": country}
        row = fz.card_fraud_row(req, card, merchants[mi])
        risk = -6.2 + 3.6 * comp + 1.5 * row[3] + 0.25 * min(row[1], 8) + 1.0 * row[4]
        risk += 40 * row[5] + 0.5 * card[8] + 0.8 * card[7]
        labels.append(rng.random() < sigmoid(np.array(risk)))
        rows.append(row)
    return fz.to_matrix(rows), np.asarray(labels, dtype=np.int32)


def _host_part(rng: np.random.Generator) -> str:
    return f"{rng.integers(256)}.{rng.integers(256)}.{rng.integers(1, 255)}"


def ad_fraud_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    agents_human = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Mobile Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15",
    ]
    agents_bot = ["python-requests/2.32", "curl/8.5.0", "Mozilla/5.0 HeadlessChrome/126.0", ""]
    rows, labels = [], []
    for _ in range(n):
        fraud = rng.random() < 0.03
        sneaky = fraud and rng.random() < 0.4  # bots that fake a browser agent
        impressions = int(rng.lognormal(7.5 if fraud else 5.0, 1.0))
        ctr = rng.beta(2, 20) if fraud else rng.beta(1.2, 80)
        clicks = int(rng.binomial(impressions, ctr))
        if fraud and not sneaky:
            agent = str(rng.choice(agents_bot))
        else:
            agent = str(rng.choice(agents_human))
        if fraud and rng.random() < 0.6:
            ip = f"{rng.choice(['34', '52', '104', '185'])}.{_host_part(rng)}"
        elif rng.random() < 0.1:
            ip = f"192.168.{rng.integers(256)}.{rng.integers(1, 255)}"
        else:
            ip = f"{rng.integers(60, 220)}.{_host_part(rng)}"
        req = {
            "impressions_24h": impressions,
            "clicks_24h": clicks,
            "ip_address": ip,
            "user_agent": agent,
        }
        rows.append(fz.ad_fraud_row(req))
        labels.append(fraud if rng.random() > 0.02 else not fraud)  # label noise
    return fz.to_matrix(rows), np.asarray(labels, dtype=np.int32)


def ctr_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    format_lift = {"banner": -0.3, "video": 0.6, "native": 0.4, "interstitial": 0.2}
    segment_lift = dict(
        zip(fz.USER_SEGMENTS, rng.normal(0, 0.35, len(fz.USER_SEGMENTS)), strict=True)
    )
    rows, labels = [], []
    for _ in range(n):
        placement = f"placement_{rng.integers(1000)}"
        fmt = str(rng.choice(fz.AD_FORMATS, p=[0.5, 0.15, 0.25, 0.1]))
        k = int(rng.integers(0, 4))
        segments = [str(s) for s in rng.choice(fz.USER_SEGMENTS, k, replace=False)]
        hour, day = int(rng.integers(24)), int(rng.integers(7))
        req = {
            "placement_id": placement,
            "ad_format": fmt,
            "user_segments": segments,
            "time_of_day": hour,
            "day_of_week": day,
        }
        logit = -4.0 + format_lift[fmt] + sum(segment_lift[s] for s in segments)
        logit += 0.4 * np.sin(2 * np.pi * (hour - 14) / 24) + 0.2 * (day >= 5)
        logit += (fz.stable_bucket(placement, 64) - 32) / 40
        rows.append(fz.ctr_row(req))
        labels.append(rng.random() < sigmoid(np.array(logit)))
    return fz.to_matrix(rows), np.asarray(labels, dtype=np.int32)


def bid_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows, targets = [], []
    for _ in range(n):
        floor = float(rng.lognormal(np.log(2.0), 0.5))
        ctr = float(rng.beta(2, 80))
        competition = str(rng.choice(fz.COMPETITION_LEVELS, p=[0.3, 0.5, 0.2]))
        budget = float(rng.lognormal(np.log(800), 1.2))
        req = {
            "placement_id": f"placement_{rng.integers(1000)}",
            "floor_cpm": floor,
            "predicted_ctr": ctr,
            "competition_level": competition,
            "budget_remaining": budget,
        }
        row = fz.bid_row(req)
        value = 1000 * ctr * 0.12  # expected value per mille at a $0.12 click value
        pressure = 1 + 0.25 * row[2]
        pacing = min(1.0, np.log1p(budget) / 7)
        optimal = max(floor * 1.02, value * pressure * pacing) + rng.normal(0, 0.15)
        rows.append(row)
        targets.append(optimal)
    return fz.to_matrix(rows), np.asarray(targets, dtype=np.float32)


def personalization_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    users = user_population(rng, max(n // 5, 500))
    _, items = item_population(rng, 40)
    sessions = session_population(rng, max(n // 5, 500))
    rows, targets = [], []
    for _ in range(n):
        user = users[rng.integers(len(users))]
        item = items[rng.integers(len(items))]
        session = sessions[rng.integers(len(sessions))]
        category = fz.ITEM_CATEGORIES[int(item[3])]
        req = {"item_category": category, "item_price": float(item[0])}
        row = fz.personalization_row(req, user, item, session)
        affinity, engagement, price_ratio = row[6], row[5], row[8]
        relevance = sigmoid(np.array(6 * affinity - 1.5 + 0.8 * engagement + 0.02 * row[11]))
        conversion = sigmoid(
            np.array(-3.5 + 3 * affinity + 0.4 * np.log1p(row[2]) - 0.5 * np.log1p(price_ratio))
        )
        engagement_score = sigmoid(np.array(-1 + 2.5 * engagement + 0.15 * row[1] - 0.05 * row[4]))
        noise = rng.normal(0, 0.03, 3)
        targets.append(
            np.clip(
                [relevance + noise[0], conversion + noise[1] / 3, engagement_score + noise[2]], 0, 1
            )
        )
        rows.append(row)
    return fz.to_matrix(rows), np.asarray(targets, dtype=np.float32)


SPECIES = ("setosa", "versicolor", "virginica")
SPECIES_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def species_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Three flower species measured in cm, drawn around the classic iris class means."""
    means = np.array([[5.0, 3.4, 1.5, 0.25], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    spread = np.array([[0.35, 0.38, 0.17, 0.1], [0.5, 0.31, 0.47, 0.2], [0.63, 0.32, 0.55, 0.27]])
    labels = rng.integers(0, 3, n)
    x = rng.normal(means[labels], spread[labels])
    return np.clip(x, 0.05, None).astype(np.float32), labels.astype(np.int32)


def two_feature_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(1.5, 1.0, (n, 2))
    y = rng.random(n) < sigmoid(1.8 * x[:, 0] - 1.2 * x[:, 1] - 0.9)
    return x.astype(np.float32), y.astype(np.int32)
