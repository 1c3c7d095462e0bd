"""Integers written in text that a client sends (query strings, headers)."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")


def decimal_int(raw: str, low: int, high: int) -> int | None:
    """``raw`` as an integer in ``low..high`` if it is ASCII decimal digits alone, else
    None. Not int(): it also takes "1_0", "+5", " 5 " and non-ASCII digits such as "٣"."""
    if _DIGITS.fullmatch(raw) is None:
        return None
    significant = raw.lstrip("0")
    if len(significant) > len(str(high)):  # out of range, and no int() of 4,000 digits
        return None
    value = int(significant or "0")
    return value if low <= value <= high else None
