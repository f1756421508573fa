"""LLM-written fraud explanations for `/score/fraud`, with a hard deadline and a quiet fallback.

`explain_fraud(context)` returns a validated `FraudExplanation`, or None when the LLM is
disabled, down, behind an open breaker, refuses the input, or does not answer within
`TIFFIN_LLM_EXPLAIN_TIMEOUT_MS`. The scoring path then keeps its rule-based explanation: the
LLM can only add to a fraud score, never delay or break it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Literal

from tiffin.errors import InvalidInput
from tiffin.llm.engine import Prompt, StructuredTarget
from tiffin.llm.errors import LLMError
from tiffin.llm.metrics import llm_metrics
from tiffin.llm.response_models import FraudExplanation
from tiffin.llm.runtime import LLM

log = logging.getLogger("tiffin.llm")

TARGET = StructuredTarget.from_model("fraud_explanation", FraudExplanation)
SYSTEM = (
    "You explain card-fraud scores to a risk analyst. Use only the facts given. Reply with one "
    "JSON object: summary (one sentence), risk_level, key_factors (most important first), "
    "recommended_action and confidence (0 to 1)."
)
CONTEXT_FIELDS = (
    "card_id",
    "transaction_amount",
    "merchant_id",
    "mcc_code",
    "country_code",
    "fraud_score",
    "risk_level",
    "recommended_action",
    "top_risk_factors",
    "explanation",
)


def _fact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fact(v) for v in value[:5]) or "none"
    return str(value)[:64]


def fraud_prompt(context: Mapping[str, Any]) -> Prompt:
    facts = "\n".join(
        f"- {key}: {_fact(context[key])}"
        for key in CONTEXT_FIELDS
        if key in context and context[key] is not None
    )
    return Prompt(
        messages=(
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Transaction and model output:\n{facts}"},
        )
    )


def _fallback(llm: LLM, reason: str) -> None:
    llm_metrics().requests.labels(
        llm.model_id, llm.model_version, llm.engine_kind, "explain_fraud", reason
    ).inc()


async def explain_fraud(
    context: Mapping[str, Any],
    llm: LLM,
    timeout_ms: float | None = None,
) -> FraudExplanation | None:
    """A structured explanation of one fraud score, or None (then use the rule-based one).

    `context` holds the request and response fields of `/score/fraud` (see CONTEXT_FIELDS);
    unknown keys are ignored and values are truncated before they reach the prompt.
    """
    if llm.engine is None:
        _fallback(llm, "fallback_unavailable")
        return None
    if llm.breaker.state == "open":
        _fallback(llm, "fallback_breaker_open")
        return None
    timeout = (timeout_ms or llm.settings.explain_timeout_ms) / 1000
    try:
        params = llm.params(llm.settings.explain_max_tokens, 0.3, 1.0, None, None, structured=True)
        result = await asyncio.wait_for(
            llm.structured(fraud_prompt(context), params, TARGET, "explain_fraud"), timeout
        )
    except TimeoutError:
        log.info("LLM fraud explanation timed out after %.0f ms; rule-based kept", timeout * 1000)
        _fallback(llm, "fallback_timeout")
        return None
    except (LLMError, InvalidInput) as exc:
        log.info("LLM fraud explanation unavailable (%s); rule-based kept", exc)
        _fallback(llm, "fallback_error")
        return None
    return FraudExplanation.model_validate(result.value)


def rule_based_explanation(context: Mapping[str, Any]) -> FraudExplanation:
    """The same structure, from the rule-based fields `/score/fraud` always computes."""
    score = float(context.get("fraud_score", 0.0))
    factors = [str(f)[:40] for f in (context.get("top_risk_factors") or [])][:3]
    level = context.get("risk_level")
    action = context.get("recommended_action")
    return FraudExplanation(
        summary=str(context.get("explanation") or f"fraud score {score:.3f}")[:160] or "n/a",
        risk_level=level if level in ("low", "medium", "high") else "medium",
        key_factors=factors or ["no dominant risk factor"],
        recommended_action=action if action in ("approve", "review", "decline") else "review",
        confidence=round(min(1.0, max(0.0, max(score, 1 - score))), 6),
    )


async def explain_fraud_or_rules(
    context: Mapping[str, Any], llm: LLM, timeout_ms: float | None = None
) -> tuple[FraudExplanation, Literal["llm", "rules"]]:
    """Always a FraudExplanation: the LLM's when it answers in time, else the rule-based one."""
    written = await explain_fraud(context, llm, timeout_ms)
    if written is not None:
        return written, "llm"
    return rule_based_explanation(context), "rules"
