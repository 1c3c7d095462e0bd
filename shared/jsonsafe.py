"""What JSON PostgreSQL cannot store: a NUL character in any string (jsonb and text
refuse it). Pure."""

from __future__ import annotations

from typing import Any


def nul_path(value: Any, loc: list[str | int]) -> list[str | int] | None:
    """Where the first string (or key) with a NUL character is, if any."""
    if isinstance(value, str):
        return loc if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return loc
            if (found := nul_path(item, [*loc, key])) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if (found := nul_path(item, [*loc, index])) is not None:
                return found
    return None
