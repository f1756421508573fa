"""The seeds' request bodies, verbatim."""

AD_FRAUD = {
    "user_id": "user_123",
    "ip_address": "192.168.1.1",
    "user_agent": "Mozilla/5.0...",
    "impressions_24h": 1000,
    "clicks_24h": 50,
}
CTR = {
    "placement_id": "placement_456",
    "ad_format": "banner",
    "user_segments": ["sports", "tech"],
    "time_of_day": 14,
    "day_of_week": 3,
}
BID = {
    "placement_id": "placement_789",
    "floor_cpm": 2.5,
    "predicted_ctr": 0.025,
    "competition_level": "medium",
    "budget_remaining": 1000.0,
}
CARD_FRAUD = {
    "card_id": "card_00001234",
    "transaction_amount": 150.0,
    "merchant_id": "merchant_12345",
    "mcc_code": "5411",
    "country_code": "US",
}
CARD_FRAUD_HIGH_RISK = {
    "card_id": "card_00001234",
    "transaction_amount": 150.0,
    "merchant_id": "merchant_high_risk",
    "mcc_code": "5816",
}
PERSONALIZATION = {
    "user_id": "user_00005678",
    "item_id": "item_electronics_001",
    "item_category": "electronics",
    "item_price": 299.99,
    "session_id": "session_abc123",
}
BATCH = {
    "model_type": "fraud_detection",
    "requests": [
        {"card_id": "card_1", "transaction_amount": 100},
        {"card_id": "card_2", "transaction_amount": 500},
    ],
    "batch_id": "batch_20240902_001",
}
GENERIC = {
    "model_name": "your_model",
    "features": {"feature1": [1.0, 2.0, 3.0], "feature2": [0.5, 1.5, 2.5]},
    "correlation_id": "test-123",
}
V1_PREDICT = {"instances": [[5.1, 3.5, 1.4, 0.2]], "version": "v2-quantized"}

SCORING_ROUTES = (
    ("/score/fraud", CARD_FRAUD),
    ("/score/personalization", PERSONALIZATION),
    ("/score/batch", BATCH),
    ("/predict/fraud", AD_FRAUD),
    ("/predict/ctr", CTR),
    ("/predict/bid", BID),
    ("/predict", GENERIC),
    ("/v1/models/predict", V1_PREDICT),
)
"""Every scoring route with its seed's example body."""
