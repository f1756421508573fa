"""Constrained decoding with the real tiny model: every schema of a 12-schema set comes out valid.

The tiny Llama is built by the project's own command (`models.tiny_llm.ensure`) into the session's
private BentoML store. Its text is nonsense; the point is that, whatever it wants to write, the
output validates against the schema and closes within the token budget. The numeric-range
regexes are checked exhaustively against Python's own comparison.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from models import tiny_llm
from tiffin.errors import InvalidInput
from tiffin.llm.constrained import (
    Constraint,
    DecodingLimits,
    SchemaCache,
    SchemaError,
    schema_regex,
)
from tiffin.llm.engine import Prompt
from tiffin.llm.numeric import integer_range, number_range, scaled_bounds
from tiffin.llm.runtime import LLM
from tiffin.llm.settings import LLMSettings

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "active": {"type": "boolean"}},
        "required": ["name", "active"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "risk": {"enum": ["low", "medium", "high"]},
            "action": {"type": "string", "enum": ["approve", "review", "decline"]},
            "priority": {"enum": [1, 2, 3]},
        },
        "required": ["risk", "action", "priority"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "probability": {"type": "number", "minimum": 0, "maximum": 1},
            "age": {"type": "integer", "minimum": 18, "maximum": 120},
            "delta": {"type": "number", "exclusiveMinimum": -5.5, "exclusiveMaximum": 3.25},
            "tiny": {"type": "number", "minimum": 0.001, "maximum": 0.002},
        },
        "required": ["probability", "age", "delta", "tiny"],
    },
    "unbounded_integer_root": {"type": "integer"},
    "negative_range": {"type": "integer", "minimum": -300, "maximum": -250},
    "array_of_strings": {
        "type": "array",
        "items": {"type": "string", "minLength": 2, "maxLength": 12},
        "minItems": 1,
        "maxItems": 3,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number", "minimum": 0, "maximum": 1000},
                    },
                    "required": ["sku", "qty", "price"],
                },
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "customer": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "maxLength": 8},
                    "address": {
                        "type": "object",
                        "properties": {
                            "country": {"type": "string", "enum": ["US", "GB", "DE"]},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["country", "zip"],
                    },
                },
                "required": ["id", "address"],
            },
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["customer", "score"],
    },
    "nullable_and_optional": {
        "type": "object",
        "properties": {
            "note": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
            "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
            "extra": {"type": "boolean"},
        },
        "required": ["note", "count"],
    },
    "refs_and_defs": {
        "$defs": {
            "Money": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "minimum": 0, "maximum": 99999},
                    "currency": {"const": "USD"},
                },
                "required": ["amount", "currency"],
            }
        },
        "type": "object",
        "properties": {"total": {"$ref": "#/$defs/Money"}, "tax": {"$ref": "#/$defs/Money"}},
        "required": ["total", "tax"],
    },
    "matrix": {
        "type": "array",
        "items": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 2,
            "maxItems": 2,
        },
        "minItems": 2,
        "maxItems": 3,
    },
    "string_formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["day", "id"],
    },
}


@pytest.fixture(scope="module")
def llm() -> LLM:
    tiny_llm.ensure()
    return LLM.from_settings(LLMSettings(model_name=f"{tiny_llm.NAME}:{tiny_llm.VERSION}"))


@pytest.fixture(scope="module")
def cache(llm: LLM) -> SchemaCache:
    assert llm.engine is not None, llm.unavailable_reason
    schemas = llm.engine.schemas  # type: ignore[attr-defined]
    assert isinstance(schemas, SchemaCache)
    return schemas


def test_schema_set_has_the_shapes_the_issue_names() -> None:
    text = json.dumps(SCHEMAS)
    assert len(SCHEMAS) >= 10
    for shape in ('"enum"', '"maximum"', '"exclusiveMinimum"', '"items"', '"$ref"', '"pattern"'):
        assert shape in text


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_tiny_model_output_validates_for_every_schema(llm: LLM, name: str) -> None:
    schema = SCHEMAS[name]
    validator = Draft202012Validator(schema)
    target = llm.target(schema, None, name)
    prompt = Prompt(messages=({"role": "user", "content": f"Give me a {name} as JSON."},))

    async def run(seed: int, budget: int) -> Any:
        params = llm.params(budget, temperature=1.0, seed=seed, structured=True)
        result = await llm.structured(prompt, params, target)
        assert result.finished.completion_tokens <= budget
        assert result.attempts == 1, "constrained decoding needed a retry"
        return result.value

    async def all_runs() -> list[Any]:
        return [await run(seed, budget) for seed, budget in ((1, 200), (2, 200), (3, 120))]

    for value in asyncio.run(all_runs()):
        errors = [e.message for e in validator.iter_errors(value)]
        assert errors == [], (name, value)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_tightest_budget_still_closes_and_validates(cache: SchemaCache, name: str) -> None:
    """A random walk over the allowed tokens (a far wilder 'model' than the tiny Llama) with the
    smallest budget that can work, and a slightly larger one, always ends valid."""
    compiled = cache.get(SCHEMAS[name])
    validator = Draft202012Validator(SCHEMAS[name])
    table = cache.table
    rng = np.random.default_rng(7)
    for budget in (compiled.min_tokens, compiled.min_tokens + 3, compiled.min_tokens + 40):
        for _ in range(5):
            walk = Constraint(compiled, budget, table.eos_ids)
            while not walk.complete:
                allowed = walk.allowed()
                assert len(allowed) > 0
                walk.advance(int(rng.choice(allowed)))
            assert len(walk.tokens) <= budget
            text = b"".join(table.token_bytes[t] for t in walk.tokens).decode()
            value = json.loads(text)
            assert [e.message for e in validator.iter_errors(value)] == [], (budget, text)


def test_budget_below_the_minimum_is_a_client_error(llm: LLM) -> None:
    target = llm.target(SCHEMAS["nested_objects"], None)
    prompt = Prompt(messages=({"role": "user", "content": "x"},))
    with pytest.raises(InvalidInput, match=r"max_tokens: 5 is too small .* at least \d+ tokens"):
        asyncio.run(llm.structured(prompt, llm.params(5, structured=True), target))


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "integer", "multipleOf": 3}, "'multipleOf' is not supported"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"not": {"type": "string"}}, "'not' is not supported"),
        ({"type": "string", "format": "hostname"}, "hostname is not supported"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer satisfies the bounds"),
    ],
)
def test_schemas_constrained_decoding_cannot_honour_are_refused(
    schema: dict[str, Any], message: str
) -> None:
    with pytest.raises(SchemaError, match=message):
        schema_regex(schema, DecodingLimits())


def test_structured_endpoint_refuses_unsupported_schema_with_422(llm: LLM) -> None:
    target = llm.target({"type": "integer", "multipleOf": 3}, None)
    prompt = Prompt(messages=({"role": "user", "content": "x"},))
    with pytest.raises(InvalidInput, match=r"json_schema: .*multipleOf"):
        asyncio.run(llm.structured(prompt, llm.params(50, structured=True), target))


def test_invisible_characters_cannot_be_generated_inside_strings(cache: SchemaCache) -> None:
    rust = schema_regex({"type": "string"}, DecodingLimits())
    # outlines-core's regex dialect writes code points as \x{HHHH}; Python's re as \uHHHH
    regex = re.compile(re.sub(r"\\x\{([0-9A-Fa-f]+)\}", lambda m: "\\u" + m[1].zfill(4), rust))
    assert regex.fullmatch('"plain text"')
    for hidden in ("\u202e", "\u200b", "\ufeff", "\u2066", "\x07"):
        assert not regex.fullmatch(f'"a{hidden}b"')


def test_integer_range_matches_exactly_the_integers_in_range() -> None:
    for lo in [*range(0, 25), 37, 99, 100, 101, 118, 999]:
        for hi in range(lo, 1100, 53):
            rx = re.compile(integer_range(lo, hi))
            for v in range(0, 1200):
                assert bool(rx.fullmatch(str(v))) == (lo <= v <= hi), (lo, hi, v)


def test_number_range_matches_exactly_the_fixed_point_values_in_range() -> None:
    rng = random.Random(3)
    for _ in range(80):
        decimals = rng.randint(0, 3)
        a = round(rng.uniform(-60, 60), 3)
        b = round(a + rng.uniform(0, 80), 3)
        excl_lo, excl_hi = rng.random() < 0.3, rng.random() < 0.3
        lo, hi = scaled_bounds(Decimal(str(a)), Decimal(str(b)), decimals, excl_lo, excl_hi)
        if hi < lo:
            continue
        rx = re.compile(number_range(lo, hi, decimals))
        for k in range(lo - 25, hi + 25):
            text = f"{k / 10**decimals:.{decimals}f}"
            if text.startswith("-") and float(text) == 0:
                continue  # "-0.00" is never written
            inside = (a < k / 10**decimals if excl_lo else a <= k / 10**decimals) and (
                k / 10**decimals < b if excl_hi else k / 10**decimals <= b
            )
            assert bool(rx.fullmatch(text)) == inside, (a, b, decimals, text)


def test_schema_cache_compiles_once(cache: SchemaCache) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}
    assert cache.get(schema) is cache.get(json.loads(json.dumps(schema)))
