"""Fixtures of the overload, abuse and isolation tests: real service processes, an HTTP
client, the task types registered once per session, and small measuring helpers."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import Deployment
from tests.support import System, free_port, register_task_types

TASKS_MODULE = "tests.abuse.abuse_tasks"

MakeSystem = Callable[..., System]


def new_ports() -> dict[str, str]:
    return {
        "api_port": str(free_port()),
        "gateway_port": str(free_port()),
        "worker_metrics_port": str(free_port()),
    }


@pytest.fixture(scope="session")
async def task_types(deployment: Deployment) -> None:
    """Register the built-in and the abuse task types in the run's database once: a
    worker does that at start. The API admits only registered types."""
    await register_task_types(deployment.env(), TASKS_MODULE)


@pytest.fixture
async def systems(task_types: None) -> AsyncIterator[MakeSystem]:
    """Build Systems (each on ports of its own) for a deployment; all stopped afterwards."""
    made: list[System] = []

    def make(dep: Deployment, **env: str) -> System:
        system = System(dep.env(**env), new_ports())
        made.append(system)
        return system

    try:
        yield make
    finally:
        for system in made:
            system.stop()


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def report(name: str, latencies_s: list[float]) -> str:
    """One line of latency figures, printed by the tests (never asserted)."""
    ms = [v * 1000 for v in latencies_s]
    line = (
        f"{name}: n={len(ms)} p50={percentile(ms, 50):.1f}ms p99={percentile(ms, 99):.1f}ms "
        f"max={max(ms, default=0.0):.1f}ms"
    )
    print(line)
    return line


async def request(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, bytes, Any]:
    """Status, raw body and headers of one request."""
    async with http.request(method, url, **kw) as r:
        return r.status, await r.read(), r.headers


async def gather_limited(n: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run ``jobs`` with at most ``n`` at once, results in order."""
    sem = asyncio.Semaphore(n)

    async def run(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(run(j) for j in jobs))
