"""What JSON the services cannot keep: a NUL character in any string (PostgreSQL's jsonb
and text refuse it), and nesting deeper than a task document can be written back (orjson
writes at most 254 levels, and a task's args sit a few levels down in every answer).
Pure."""

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


MAX_DEPTH = 64


def deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels. Iterative: a body
    nested a thousand levels must not exhaust the stack."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False
