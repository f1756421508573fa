"""Constrained decoding: JSON Schema → regex → token DFA → a logits mask that always closes in time.

1. `prepare_schema` checks the schema, rejects keywords whose constraint cannot be enforced while
   decoding (`multipleOf`, `uniqueItems`, `not`, `if`, ...), bounds what the schema leaves open
   (strings get `maxLength`, arrays `maxItems`) and replaces every numeric node by a placeholder.
2. `outlines_core.json_schema.build_regex_from_schema` writes the regex; the placeholders are then
   swapped for exact numeric-range expressions (`tiffin.llm.numeric`), because outlines-core
   ignores `minimum`/`maximum`.
3. `outlines_core.Index` compiles the regex against the model's vocabulary into a DFA over token
   ids. Tiffin computes, for every DFA state, the fewest tokens that still reach an accepting state
   (a reverse breadth-first search over the transitions).
4. `Constraint` is the per-request walker. At each step it allows only the tokens the DFA allows
   *and* after which an accepting state is still reachable within the remaining token budget, so
   a model that would happily write digits forever is steered to close every string, number,
   array and object before `max_tokens` runs out. The mask is applied to the logits with MLX
   (disallowed logits become -inf) through mlx-lm's `logits_processors` hook.

The text that comes out matches the regex; callers still validate it against the schema (the
regex is a subset of the schema, but validation is what the API promises, so it is checked).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

from tiffin.llm.numeric import number_range, scaled_bounds
from tiffin.llm.vocab import TokenTable

UNSUPPORTED_KEYWORDS = (
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "patternProperties",
    "propertyNames",
    "contains",
    "minContains",
    "maxContains",
    "uniqueItems",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_SINGLE = ("items", "additionalProperties")
_NUMERIC = ("integer", "number")
# outlines-core's JSON string character class, and Tiffin's: the same minus invisible characters
# that can hide or reorder text (zero-width, line/paragraph separators, bidi controls, BOM).
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F-\x9F]'
_SAFE_STRING_CHAR = (
    r'[^"\\\x00-\x1F\x7F-\x9F\x{200B}-\x{200F}\x{2028}-\x{202E}\x{2060}-\x{2069}\x{FEFF}]'
)


class SchemaError(ValueError):
    """The schema cannot be used for constrained decoding; the message names where and why."""


@dataclass(frozen=True)
class DecodingLimits:
    """Bounds applied where a schema leaves sizes open (see LLMSettings)."""

    max_string_length: int = 40
    max_array_items: int = 4
    max_integer_digits: int = 6
    number_decimals: int = 2
    whitespace: str = r"[ ]?"


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError(f"{where}: bound must be a number")
    try:
        return Decimal(str(value))
    except InvalidOperation as exc:  # pragma: no cover - float repr is always a valid Decimal
        raise SchemaError(f"{where}: bound {value!r} is not a number") from exc


def _numeric_regex(node: dict[str, Any], limits: DecodingLimits, where: str) -> str:
    integer = node["type"] == "integer"
    widest = Decimal(10**limits.max_integer_digits - 1)
    lo, lo_excl = -widest, False
    hi, hi_excl = widest, False
    if "minimum" in node:
        lo = max(lo, _decimal(node["minimum"], f"{where}.minimum"))
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        bound = _decimal(node["exclusiveMinimum"], f"{where}.exclusiveMinimum")
        if bound >= lo:
            lo, lo_excl = bound, True
    if "maximum" in node:
        hi = min(hi, _decimal(node["maximum"], f"{where}.maximum"))
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        bound = _decimal(node["exclusiveMaximum"], f"{where}.exclusiveMaximum")
        if bound <= hi:
            hi, hi_excl = bound, True
    decimals = 0 if integer else limits.number_decimals
    while True:
        k_lo, k_hi = scaled_bounds(lo, hi, decimals, lo_excl, hi_excl)
        if k_lo <= k_hi:
            return number_range(k_lo, k_hi, decimals)
        if integer or decimals >= 6:
            raise SchemaError(f"{where}: no {node['type']} satisfies the bounds")
        decimals += 1  # a narrow range such as [0.001, 0.002] needs finer steps


class _Preparer:
    def __init__(self, limits: DecodingLimits) -> None:
        self.limits = limits
        self.placeholders: dict[str, str] = {}

    def visit(self, node: Any, where: str) -> Any:
        if isinstance(node, bool):
            if node is False:
                raise SchemaError(f"{where}: the schema `false` accepts nothing")
            return node
        if not isinstance(node, dict):
            raise SchemaError(f"{where}: a schema must be an object, got {type(node).__name__}")
        for keyword in UNSUPPORTED_KEYWORDS:
            if node.get(keyword):
                raise SchemaError(
                    f"{where}: keyword {keyword!r} is not supported by constrained decoding"
                )
        out = dict(node)
        for key in _SUBSCHEMA_MAPS:
            if isinstance(out.get(key), dict):
                out[key] = {k: self.visit(v, f"{where}.{key}.{k}") for k, v in out[key].items()}
        for key in _SUBSCHEMA_LISTS:
            if isinstance(out.get(key), list):
                out[key] = [self.visit(v, f"{where}.{key}[{i}]") for i, v in enumerate(out[key])]
        for key in _SUBSCHEMA_SINGLE:
            if isinstance(out.get(key), dict):
                out[key] = self.visit(out[key], f"{where}.{key}")
        kind = out.get("type")
        fixed = "enum" in out or "const" in out
        if isinstance(kind, list):
            if not fixed and any(k in _NUMERIC for k in kind):
                rest = {k: v for k, v in out.items() if k != "type"}
                return self.visit({"anyOf": [{**rest, "type": k} for k in kind]}, where)
            return out
        if kind in _NUMERIC and not fixed:
            placeholder = f"TIFFINNUM{len(self.placeholders)}Q"
            self.placeholders[placeholder] = _numeric_regex(out, self.limits, where)
            return {"const": placeholder}
        open_string = not any(k in out for k in ("maxLength", "pattern", "format"))
        if kind == "string" and not fixed and open_string:
            out["maxLength"] = max(self.limits.max_string_length, out.get("minLength", 0))
        if kind == "array" and "maxItems" not in out:
            out["maxItems"] = max(self.limits.max_array_items, out.get("minItems", 0))
        return out


def check_schema(schema: Any) -> None:
    """Raise SchemaError unless `schema` is a valid JSON Schema (Draft 2020-12 meta-schema)."""
    from jsonschema import Draft202012Validator
    from jsonschema import SchemaError as MetaError

    if not isinstance(schema, dict):
        raise SchemaError(f"must be a JSON object, got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except MetaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise SchemaError(f"invalid JSON Schema at {where}: {exc.message}") from exc


def schema_regex(schema: dict[str, Any], limits: DecodingLimits) -> str:
    """The regex of every JSON text the constrained decoder may write for `schema`."""
    from outlines_core.json_schema import build_regex_from_schema

    check_schema(schema)
    preparer = _Preparer(limits)
    prepared = preparer.visit(schema, "schema")
    try:
        regex = build_regex_from_schema(json.dumps(prepared), limits.whitespace)
    except (ValueError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SchemaError(f"not supported by constrained decoding: {first_line}") from exc
    regex = regex.replace(_STRING_CHAR, _SAFE_STRING_CHAR)
    for placeholder, numeric in preparer.placeholders.items():
        regex = regex.replace(f'"{placeholder}"', f"({numeric})")
        if placeholder in regex:  # pragma: no cover - would mean outlines escaped it unexpectedly
            raise SchemaError("internal: numeric placeholder could not be substituted")
    return regex


@dataclass
class _Edges:
    tokens: np.ndarray
    next_states: np.ndarray
    next_distance: np.ndarray


@dataclass
class CompiledSchema:
    """A schema compiled against one vocabulary: the token DFA and distances to acceptance."""

    regex: str
    initial: int
    finals: frozenset[int]
    transitions: dict[int, dict[int, int]]
    distance: dict[int, int]
    eos_id: int
    _edges: dict[int, _Edges] = field(default_factory=dict, repr=False)

    @property
    def min_tokens(self) -> int:
        """The fewest tokens any valid output needs (the budget must be at least this)."""
        return self.distance[self.initial]

    @property
    def states(self) -> int:
        return len(self.transitions)

    def edges(self, state: int) -> _Edges:
        found = self._edges.get(state)
        if found is None:
            pairs = [
                (tok, nxt)
                for tok, nxt in self.transitions.get(state, {}).items()
                if tok != self.eos_id and nxt in self.distance
            ]
            tokens = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
            nexts = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
            dist = np.fromiter(
                (self.distance[p[1]] for p in pairs), dtype=np.int64, count=len(pairs)
            )
            found = _Edges(tokens, nexts, dist)
            self._edges[state] = found
        return found


def _distances(transitions: dict[int, dict[int, int]], finals: frozenset[int], eos: int) -> dict:
    reverse: dict[int, set[int]] = {}
    for state, moves in transitions.items():
        for token, nxt in moves.items():
            if token != eos:
                reverse.setdefault(nxt, set()).add(state)
    distance = dict.fromkeys(finals, 0)
    queue = deque(finals)
    while queue:
        state = queue.popleft()
        for prev in reverse.get(state, ()):
            if prev not in distance:
                distance[prev] = distance[state] + 1
                queue.append(prev)
    return distance


def compile_regex(regex: str, table: TokenTable) -> CompiledSchema:
    from outlines_core import Index

    try:
        index = Index(regex, table.outlines_vocabulary())
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"cannot compile the schema for this vocabulary: {exc}") from exc
    transitions = index.get_transitions()
    finals = frozenset(index.get_final_states())
    initial = index.get_initial_state()
    distance = _distances(transitions, finals, table.eos_id)
    if initial not in distance:
        raise SchemaError("no output of this model's vocabulary can satisfy the schema")
    return CompiledSchema(regex, initial, finals, transitions, distance, table.eos_id)


class SchemaCache:
    """Compiled schemas by (schema, limits), least recently used evicted. Thread-safe."""

    def __init__(self, table: TokenTable, limits: DecodingLimits, size: int = 64) -> None:
        self.table = table
        self.limits = limits
        self.size = size
        self._items: OrderedDict[str, CompiledSchema] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, schema: dict[str, Any]) -> CompiledSchema:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        compiled = compile_regex(schema_regex(schema, self.limits), self.table)
        with self._lock:
            self._items[key] = compiled
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return compiled


class Constraint:
    """One request's walk through a CompiledSchema, with a token budget it never exceeds."""

    def __init__(self, compiled: CompiledSchema, budget: int, eos_ids: frozenset[int]) -> None:
        if compiled.min_tokens > budget:
            raise SchemaError(
                f"max_tokens={budget} is too small: this schema needs at least "
                f"{compiled.min_tokens} tokens"
            )
        self.compiled = compiled
        self.budget = budget
        self.eos_ids = eos_ids
        self.state = compiled.initial
        self.tokens: list[int] = []
        self.ended = False

    @property
    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    @property
    def accepting(self) -> bool:
        return self.state in self.compiled.finals

    @property
    def complete(self) -> bool:
        """True when the output is valid and nothing more may (or can) be added."""
        if self.ended:
            return True
        if not self.accepting:
            return False
        return self.remaining <= 0 or len(self.allowed_content()) == 0

    def allowed_content(self) -> np.ndarray:
        edges = self.compiled.edges(self.state)
        return edges.tokens[edges.next_distance <= self.remaining - 1]

    def allowed(self) -> np.ndarray:
        if self.ended:
            return np.asarray([self.compiled.eos_id], dtype=np.int64)
        tokens = self.allowed_content()
        if self.accepting:
            tokens = np.append(tokens, self.compiled.eos_id)
        return tokens

    def advance(self, token: int) -> None:
        if self.ended:
            return
        if token in self.eos_ids:
            if not self.accepting:
                raise RuntimeError("end of sequence before the output was complete")
            self.ended = True
            return
        nxt = self.compiled.transitions.get(self.state, {}).get(token)
        if nxt is None or self.compiled.distance.get(nxt, self.remaining) > self.remaining - 1:
            raise RuntimeError(f"token {token} is not allowed in state {self.state}")
        self.state = nxt
        self.tokens.append(token)

    def sync(self, generated: list[int]) -> None:
        """Advance through whatever part of `generated` this walk has not seen yet."""
        for token in generated[len(self.tokens) + (1 if self.ended else 0) :]:
            self.advance(token)

    def bias(self, width: int) -> np.ndarray:
        """0 for allowed token ids, -inf for the rest, over `width` logits."""
        out = np.full(width, -np.inf, dtype=np.float32)
        allowed = self.allowed()
        out[allowed[allowed < width]] = 0.0
        return out
