"""Token ids ↔ raw bytes for a Hugging Face tokenizer, and the outlines-core Vocabulary built on it.

Constrained decoding works on bytes: the DFA that outlines-core builds from a JSON Schema regex
moves over the UTF-8 bytes each token stands for. Byte-level BPE tokenizers (GPT-2, Llama 3,
Tiffin's tiny model) store tokens in the GPT-2 printable-byte alphabet (`Ġ` is a space);
SentencePiece tokenizers use `▁` for a space and `<0xNN>` byte-fallback tokens. Both are mapped
back to the exact bytes here, and generated text is decoded from the same table, so what the DFA
accepted is exactly what the client receives.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character → byte table (the inverse of `bytes_to_unicode`)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(pieces: list[str]) -> bool:
    table = byte_decoder()
    ordinary = [p for p in pieces if p and not (p.startswith("<") and p.endswith(">"))]
    if not ordinary:
        return False
    covered = sum(1 for p in ordinary if all(c in table for c in p))
    return covered / len(ordinary) > 0.99


def _piece_bytes(piece: str, byte_level: bool) -> bytes:
    if byte_level:
        table = byte_decoder()
        return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
    m = _SPM_BYTE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode()


@dataclass
class TokenTable:
    """Every token id's bytes, which ids are special, and the end-of-sequence ids."""

    token_bytes: list[bytes]
    special_ids: frozenset[int]
    eos_ids: frozenset[int]
    eos_id: int
    byte_level: bool
    _outlines: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, eos_ids: set[int] | frozenset[int]) -> TokenTable:
        """`tokenizer` is a transformers tokenizer (or mlx-lm's TokenizerWrapper around one)."""
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        vocab: dict[str, int] = hf.get_vocab()
        size = max(vocab.values()) + 1
        pieces = [""] * size
        for piece, idx in vocab.items():
            pieces[idx] = piece
        special = set(getattr(hf, "all_special_ids", []) or [])
        added = getattr(hf, "added_tokens_decoder", {}) or {}
        special.update(int(i) for i in added)
        byte_level = _is_byte_level([p for i, p in enumerate(pieces) if i not in special])
        token_bytes = [
            p.encode() if i in special else _piece_bytes(p, byte_level)
            for i, p in enumerate(pieces)
        ]
        eos = frozenset(int(e) for e in eos_ids)
        if not eos:
            raise ValueError("the tokenizer declares no end-of-sequence token")
        return cls(token_bytes, frozenset(special), eos, min(eos), byte_level)

    def outlines_vocabulary(self) -> Any:
        """The `outlines_core.Vocabulary` of every non-special token (built once)."""
        if self._outlines is None:
            from outlines_core import Vocabulary

            mapping: dict[bytes, list[int]] = {}
            for idx, raw in enumerate(self.token_bytes):
                if idx in self.special_ids or idx in self.eos_ids or not raw:
                    continue
                mapping.setdefault(raw, []).append(idx)
            self._outlines = Vocabulary(self.eos_id, mapping)
        return self._outlines

    def decoder(self) -> IncrementalText:
        return IncrementalText(self)


class IncrementalText:
    """Turns a token stream into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, table: TokenTable) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.raw = bytearray()

    def add(self, token: int) -> str:
        data = self._table.token_bytes[token] if token < self._table.size else b""
        self.raw.extend(data)
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
