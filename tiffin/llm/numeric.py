"""Regular expressions that match exactly the JSON numbers inside a closed range.

outlines-core turns `{"type": "integer", "minimum": 1, "maximum": 5}` into "any integer": it
ignores numeric bounds. Tiffin replaces every bounded (or, by policy, every) numeric node of a
schema with one of these expressions, so that the decoder can only write numbers the schema
accepts. Integers are written without leading zeros; numbers with a fixed count of decimals
(`12.50`), which JSON Schema and every JSON parser accept as numbers.

`integer_range` follows the well-known digit-range decomposition (as in to-regex-range): split
[lo, hi] at the 9…9 / 0…0 boundaries into pieces whose bounds have the same length, and write each
piece as a prefix followed by one character class and `[0-9]{k}`.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal


def _fill_nines(n: int, k: int) -> int:
    s = str(n)
    return int(s[:-k] + "9" * k) if k < len(s) else int("9" * k)


def _fill_zeros(n: int, k: int) -> int:
    return n - n % (10**k)


def _split(lo: int, hi: int) -> list[tuple[int, int]]:
    stops = {hi}
    nines = 1
    stop = _fill_nines(lo, nines)
    while lo <= stop < hi:
        stops.add(stop)
        nines += 1
        stop = _fill_nines(lo, nines)
    zeros = 1
    stop = _fill_zeros(hi + 1, zeros) - 1
    while lo < stop <= hi:
        stops.add(stop)
        zeros += 1
        stop = _fill_zeros(hi + 1, zeros) - 1
    pieces = []
    start = lo
    for stop in sorted(stops):
        pieces.append((start, stop))
        start = stop + 1
    return pieces


def _piece(lo: str, hi: str) -> str:
    out = []
    free = 0
    for a, b in zip(lo, hi, strict=True):
        if a == b:
            out.append(a)
        elif a == "0" and b == "9":
            free += 1
        else:
            out.append(f"[{a}-{b}]")
    if free:
        out.append("[0-9]" if free == 1 else f"[0-9]{{{free}}}")
    return "".join(out)


def integer_range(lo: int, hi: int, width: int = 0) -> str:
    """Digits of every integer in [lo, hi] (0 <= lo <= hi), left-padded with zeros to `width`."""
    if lo < 0 or hi < lo:
        raise ValueError(f"bad range [{lo}, {hi}]")
    alternatives = [_piece(str(a).zfill(width), str(b).zfill(width)) for a, b in _split(lo, hi)]
    return alternatives[0] if len(alternatives) == 1 else "(" + "|".join(alternatives) + ")"


def _magnitudes(lo: int, hi: int, decimals: int) -> str:
    """Non-negative fixed-point values lo/10^d … hi/10^d written with exactly `decimals`."""
    if decimals == 0:
        return integer_range(lo, hi)
    scale = 10**decimals
    i_lo, f_lo = divmod(lo, scale)
    i_hi, f_hi = divmod(hi, scale)

    def frac(a: int, b: int) -> str:
        return integer_range(a, b, width=decimals)

    if i_lo == i_hi:
        return rf"{i_lo}\.{frac(f_lo, f_hi)}"
    parts = [rf"{i_lo}\.{frac(f_lo, scale - 1)}"]
    if i_lo + 1 <= i_hi - 1:
        parts.append(rf"{integer_range(i_lo + 1, i_hi - 1)}\.[0-9]{{{decimals}}}")
    parts.append(rf"{i_hi}\.{frac(0, f_hi)}")
    return "(" + "|".join(parts) + ")"


def scaled_bounds(
    minimum: Decimal, maximum: Decimal, decimals: int, exclusive_min: bool, exclusive_max: bool
) -> tuple[int, int]:
    """The integer range k such that k/10^d lies within the (possibly exclusive) bounds."""
    scale = Decimal(10) ** decimals
    lo_exact = minimum * scale
    hi_exact = maximum * scale
    lo = int(lo_exact.to_integral_value(rounding=ROUND_CEILING))
    hi = int(hi_exact.to_integral_value(rounding=ROUND_FLOOR))
    if exclusive_min and lo == lo_exact:
        lo += 1
    if exclusive_max and hi == hi_exact:
        hi -= 1
    return lo, hi


def number_range(lo: int, hi: int, decimals: int) -> str:
    """JSON numbers k/10^decimals for every integer k in [lo, hi] (lo <= hi, any signs)."""
    if hi < lo:
        raise ValueError(f"empty range [{lo}, {hi}]")
    parts = []
    if hi >= 0:
        parts.append(_magnitudes(max(lo, 0), hi, decimals))
    if lo < 0:
        parts.append("-" + _magnitudes(max(-hi, 1), -lo, decimals))
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"
