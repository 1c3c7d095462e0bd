"""Readiness checks and Prometheus text, the same on every service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.singleflight import SingleFlight

Check = Callable[[], Awaitable[Any]]
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class Readiness:
    """A process's /readyz: every dependency's check at once, the answer within
    ``answer_within`` (LONGHAUL_READY_TIMEOUT_S), a check not done by then reported
    "down: TimeoutError". A probe's own timeout (Kubernetes': 1 s) is shorter than an
    I/O timeout, and a probe that times out tells nothing of which dependency hangs.

    A check late for the answer runs on, up to ``check_timeout`` (LONGHAUL_IO_TIMEOUT_S),
    and the probes that come meanwhile wait for it rather than start their own: at most
    one check per dependency is in flight. Cancelled instead, each probe against a hung
    dependency would leave work behind: asyncpg holds a cancelled query's pooled
    connection until the server acknowledges the cancel (up to the pool's timeout), and
    redis-py drops a cancelled command's connection, so the next opens another."""

    def __init__(
        self, checks: Mapping[str, Check], *, answer_within: float, check_timeout: float
    ) -> None:
        self._checks = dict(checks)
        self._answer_within = answer_within
        self._check_timeout = check_timeout
        self._flights: SingleFlight[str, None] = SingleFlight("readiness-check")

    async def __call__(self) -> tuple[bool, dict[str, Any]]:
        names = list(self._checks)
        results = await asyncio.gather(*(self._one(n) for n in names))
        body = dict(zip(names, results, strict=True))
        ok = all(r == "ok" for r in results)
        return ok, {"status": "ok" if ok else "unavailable", "dependencies": body}

    async def _one(self, name: str) -> str:
        try:
            await asyncio.wait_for(
                self._flights.run(name, lambda: self._bounded(name)), self._answer_within
            )
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; we report it
            return f"down: {type(exc).__name__}"
        return "ok"

    async def _bounded(self, name: str) -> None:
        await asyncio.wait_for(self._checks[name](), self._check_timeout)

    async def aclose(self) -> None:
        """Cancel the checks still in flight, and wait for them."""
        await self._flights.aclose()


def metrics_text() -> bytes:
    return bytes(generate_latest())
