"""Readiness checks and Prometheus text, the same on every service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

Check = Callable[[], Awaitable[Any]]
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


async def readiness(checks: Mapping[str, Check], timeout: float) -> tuple[bool, dict[str, Any]]:
    """Run every check at once, each under ``timeout``; report each dependency's state."""

    async def one(check: Check) -> str:
        try:
            await asyncio.wait_for(check(), timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; we report it
            return f"down: {type(exc).__name__}"
        return "ok"

    names = list(checks)
    results = await asyncio.gather(*(one(checks[n]) for n in names))
    body = dict(zip(names, results, strict=True))
    ok = all(r == "ok" for r in results)
    return ok, {"status": "ok" if ok else "unavailable", "dependencies": body}


def metrics_text() -> bytes:
    return bytes(generate_latest())
