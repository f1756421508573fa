"""Guards around the LLM: input limits, prompt-injection screening, output sanitization.

Prompt-injection screening is a documented, deliberately small rule set (below and in
docs/llm.md), tested against a corpus of attacks and of benign prompts that look similar
(tests/test_llm_guards.py). Rules match on a normalized copy of the text: Unicode NFKC, lower
case, invisible characters removed, whitespace collapsed, so `I g n o r e` tricks with
zero-width characters or full-width letters do not slip through. It is a first line of defence
that stops the common, known phrasings; it is not a proof against a determined attacker, which is
why outputs are also sanitized and structured outputs are schema-constrained.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from tiffin.errors import InvalidInput

# Zero-width characters, line/paragraph separators, bidi embeddings/overrides/isolates, BOM.
INVISIBLE = re.compile("[\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")
SPECIAL_TOKEN = re.compile(
    r"<\|[a-z0-9_]{1,24}\|>|</?s>|\[/?inst\]|<</?sys>>|<(start|end)_of_turn>", re.IGNORECASE
)


@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    pattern: re.Pattern[str]
    raw: bool = False  # match on the original text instead of the normalized one


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE | re.DOTALL)


RULES: tuple[Rule, ...] = (
    Rule(
        "override-instructions",
        "Asks the model to ignore, forget or override its earlier instructions or rules.",
        _rx(
            r"\b(ignore|disregard|forget|override|bypass|skip|drop)\b[^.!?\n]{0,40}?"
            r"\b(all|any|every|previous|prior|above|earlier|preceding|initial|original|"
            r"system|your|the)\b[^.!?\n]{0,30}?"
            r"\b(instructions?|prompts?|rules|directives?|guidelines|guardrails|"
            r"constraints|programming)\b"
        ),
    ),
    Rule(
        "system-prompt-extraction",
        "Asks the model to reveal, repeat or print its system prompt or hidden instructions.",
        _rx(
            r"\b(reveal|show|print|repeat|output|display|leak|dump|tell me|give me|what (is|are)|"
            r"recite|spell out)\b[^.!?\n]{0,30}?\b(your|the|its|initial|hidden|secret|original)"
            r"\b[^.!?\n]{0,20}?\b(system prompt|system message|hidden (prompt|instructions)|"
            r"(initial|original|secret|hidden) instructions|instructions above|pre-?prompt)"
        ),
    ),
    Rule(
        "role-hijack",
        "Tries to switch the model into an unrestricted persona (DAN, developer or god mode, "
        "'you are now ... without restrictions').",
        _rx(
            r"\b(do anything now|developer mode|god mode|jailbr(eak|oken)|dan mode)\b|"
            r"\byou are (now|no longer)\b[^.!?\n]{0,40}?\b(unrestricted|unfiltered|uncensored|"
            r"free of|without (any )?(rules|restrictions|limits|filters)|an? (ai|assistant|model) "
            r"(with|without))|"
            r"\b(act|behave|pretend|roleplay)\b[^.!?\n]{0,30}?\b(as|to be|like)\b[^.!?\n]{0,30}?"
            r"\b(unrestricted|unfiltered|uncensored|no (rules|restrictions|filters)|evil)\b"
        ),
    ),
    Rule(
        "chat-template-injection",
        "Contains chat-template role markers (<|system|>, <|im_start|>, [INST], <<SYS>>, "
        "'### System:') that try to open a new system or assistant turn.",
        _rx(
            r"<\|(system|user|assistant|im_start|im_end|end|eot_id|start_header_id)\|>|"
            r"\[/?inst\]|<</?sys>>|<(start|end)_of_turn>|"
            r"(^|\n)\s*#{2,}\s*(system|instruction|new instructions)\s*:|"
            r"(^|\n)\s*(system|assistant)\s*:\s*(you|ignore|from now)"
        ),
        raw=True,
    ),
    Rule(
        "safety-bypass",
        "Asks to disable or get around safety filters, moderation or content policy.",
        _rx(
            r"\b(disable|turn off|switch off|bypass|circumvent|get around|evade|deactivate)\b"
            r"[^.!?\n]{0,30}?\b(safety|content (policy|filters?)|moderation|guardrails?|"
            r"filters?|censorship|restrictions)\b"
        ),
    ),
    Rule(
        "encoded-instructions",
        "Asks to decode a payload (base64, hex, rot13) and follow or execute what it says.",
        _rx(
            r"\b(decode|decrypt|translate|convert)\b[^.!?\n]{0,40}?\b(base ?64|hex|rot ?13|"
            r"binary|morse)\b[^.!?\n]{0,60}?\b(follow|execute|run|obey|do what|carry out|"
            r"act on|apply)\b"
        ),
    ),
    Rule(
        "secret-exfiltration",
        "Asks to send or reveal credentials, keys, environment variables or conversation data "
        "to an address, or embeds a markdown image pointing at an external URL.",
        _rx(
            r"\b(send|post|upload|forward|exfiltrate|leak|email|transmit|reveal|print|output)\b"
            r"[^.!?\n]{0,50}?\b(api[ _-]?keys?|passwords?|secrets?|access tokens?|credentials|"
            r"private keys?|env(ironment)? variables|conversation history|chat history)\b"
            r"[^.!?\n]{0,60}?\b(to|at|via)\b[^.!?\n]{0,30}?(https?://|www\.|@|webhook)|"
            r"!\[[^\]]*\]\(\s*https?://[^)]*(\?|&)[^)]*=\s*[{<$]"
        ),
    ),
    Rule(
        "hidden-text",
        "Contains bidirectional-override or isolate control characters that can hide or "
        "reorder instructions (Trojan Source style).",
        BIDI_CONTROLS,
        raw=True,
    ),
)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = INVISIBLE.sub("", text)
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass(frozen=True)
class Finding:
    rule: str
    where: str
    excerpt: str


def screen(texts: Iterable[tuple[str, str]]) -> list[Finding]:
    """Every rule match in `texts` (pairs of field name and text)."""
    findings = []
    for where, text in texts:
        normalized = normalize(text)
        for rule in RULES:
            match = rule.pattern.search(text if rule.raw else normalized)
            if match:
                excerpt = match.group(0)[:60]
                findings.append(Finding(rule.id, where, excerpt))
    return findings


def check_text(field: str, text: str, max_chars: int) -> None:
    """422 for an empty or oversized prompt, naming the field and the limit."""
    if not text or not text.strip():
        raise InvalidInput(f"{field}: must not be empty")
    if len(text) > max_chars:
        raise InvalidInput(
            f"{field}: {len(text)} characters is over the limit of {max_chars} "
            "(TIFFIN_LLM_MAX_PROMPT_CHARS)"
        )


def check_max_tokens(field: str, value: int | None, default: int, limit: int) -> int:
    if value is None:
        return min(default, limit)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field}: must be an integer")
    if value < 1 or value > limit:
        raise InvalidInput(
            f"{field}: {value} is out of range; it must be between 1 and {limit} "
            "(TIFFIN_LLM_MAX_TOKENS_LIMIT)"
        )
    return value


def sanitize(text: str) -> tuple[str, list[str]]:
    """Strip what must never reach a client from model output; returns (text, what was removed).

    Removed: ANSI escape sequences, control characters other than tab/newline/carriage return,
    invisible and bidi characters, and chat-template special tokens leaking into the text.
    """
    removed = []
    for name, pattern in (
        ("ansi-escape", ANSI),
        ("control-character", CONTROL),
        ("invisible-character", INVISIBLE),
        ("special-token", SPECIAL_TOKEN),
    ):
        cleaned = pattern.sub("", text)
        if cleaned != text:
            removed.append(name)
            text = cleaned
    return text, removed


def sanitize_value(value: object) -> tuple[object, list[str]]:
    """`sanitize` applied to every string inside a JSON value (keys included)."""
    removed: list[str] = []

    def walk(v: object) -> object:
        if isinstance(v, str):
            cleaned, what = sanitize(v)
            removed.extend(what)
            return cleaned
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        return v

    return walk(value), sorted(set(removed))
