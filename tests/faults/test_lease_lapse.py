"""A worker cut off from PostgreSQL alone (a proxy of the test's own between them; the
shared PostgreSQL untouched): once its lease lapses it stops its handler, before
another worker reaps the attempt and runs the task again; a shorter cut stops nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.conftest import Deployment
from tests.faults.conftest import MakeRun
from tests.faults.harness import FAULT_ENV, FaultRun
from tests.faults.ledger_tasks import watched_key
from tests.faults.proxy import CutProxy
from tests.support import ServiceProcess, eventually, worker_metric

LEASE_S = float(FAULT_ENV["LONGHAUL_LEASE_S"])
# One run slot and no reserved one: the cut worker's slot stays busy (its outcome waits
# for the database), so the next attempt's message goes to the other worker.
ONE_SLOT = {"worker_concurrency": "1", "worker_high_reserved": "0"}


@pytest.fixture
async def proxy(deployment: Deployment) -> AsyncIterator[CutProxy]:
    async with CutProxy(urlsplit(deployment.database_url).port or 5432) as cut:
        yield cut


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)
    netloc = (host[0] + "@" if len(host) == 2 else "") + f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _submit(run: FaultRun, sleep_s: float) -> UUID:
    async with run.http.post(
        f"{run.system.api_url}/v1/tasks",
        json={"type": "fault.watched", "args": {"sleep_s": sleep_s}},
        headers=run.headers,
    ) as response:
        body = await response.json()
        assert response.status == 202, body
        return UUID(body["id"])


async def _running_behind(
    run: FaultRun, deployment: Deployment, proxy: CutProxy, redis: Redis, sleep_s: float
) -> tuple[ServiceProcess, UUID]:
    """The API, and worker A behind the proxy running a task of ``sleep_s``."""
    await run.start_api()
    a = await run.start_worker(
        database_url=_through(deployment.database_url, proxy.port), **ONE_SLOT
    )
    task_id = await _submit(run, sleep_s)
    await eventually(lambda: _notes(redis, task_id), within=20, what="A's handler to start")
    return a, task_id


async def _tear_down(run: FaultRun, proxy: CutProxy, redis: Redis, task_id: UUID | None) -> None:
    proxy.restore()  # so A drains at once
    if task_id is not None:
        # Cancelled, or a hand-back at the stop would run it in the next test's workers.
        with contextlib.suppress(aiohttp.ClientError):
            url = f"{run.system.api_url}/v1/tasks/{task_id}/cancel"
            async with run.http.post(url, headers=run.headers):
                pass
        await redis.delete(watched_key(task_id))
    await asyncio.to_thread(run.system.stop)  # the proxy runs on this loop meanwhile
    await redis.aclose()


async def _notes(redis: Redis, task_id: UUID) -> list[str]:
    return [n.decode() for n in await redis.lrange(watched_key(task_id), 0, -1)]


async def test_a_worker_cut_off_from_postgresql_stops_its_handler_before_the_rerun(
    make_run: MakeRun, deployment: Deployment, proxy: CutProxy, http: aiohttp.ClientSession
) -> None:
    """Worker A reaches PostgreSQL through the proxy, B directly. Cut A off mid-run: B
    reaps the attempt once its lease ran out and runs it again, and A's handler was
    stopped (lease lapsed) before B's began."""
    run = make_run()
    redis = Redis.from_url(deployment.redis_url)
    task_id: UUID | None = None
    try:
        a, task_id = await _running_behind(run, deployment, proxy, redis, sleep_s=60)
        b = await run.start_worker()
        proxy.cut()

        async def rerun() -> bool:
            return any(n.startswith("start:2:") for n in await _notes(redis, task_id))

        await eventually(rerun, within=30, what="B to run the task again")
        notes = await _notes(redis, task_id)
        assert notes[0] == f"start:1:{a.pid}", notes
        assert f"start:2:{b.pid}" in notes, notes
        # By the order of the notes in one Redis list: A stopped before B started.
        assert f"stopped:1:{a.pid}" in notes, notes
        assert notes.index(f"stopped:1:{a.pid}") < notes.index(f"start:2:{b.pid}"), notes
        lapsed = await worker_metric(run.system, http, "longhaul_worker_leases_lapsed_total")
        assert lapsed == 1
        assert "leases unrenewed for a lease: handlers stopped" in a.output()
    finally:
        await _tear_down(run, proxy, redis, task_id)


async def test_a_cut_shorter_than_the_lease_stops_nothing(
    make_run: MakeRun, deployment: Deployment, proxy: CutProxy, http: aiohttp.ClientSession
) -> None:
    """A third of a lease without PostgreSQL: the renewals after it come in time, and the
    attempt runs to its end, once."""
    run = make_run()
    redis = Redis.from_url(deployment.redis_url)
    task_id: UUID | None = None
    try:
        a, task_id = await _running_behind(run, deployment, proxy, redis, sleep_s=2 * LEASE_S)
        proxy.cut()
        await asyncio.sleep(LEASE_S / 3)  # the cut's length, not a bound on anything
        proxy.restore()

        async def ended() -> bool:
            state = await run.pool.fetchval("SELECT state FROM tasks WHERE id = $1", task_id)
            return state == "succeeded"

        await eventually(ended, within=30, what="the task to succeed")
        assert await _notes(redis, task_id) == [f"start:1:{a.pid}", f"done:1:{a.pid}"]
        assert await run.pool.fetchval("SELECT attempts FROM tasks WHERE id = $1", task_id) == 1
        lapsed = await worker_metric(run.system, http, "longhaul_worker_leases_lapsed_total")
        assert lapsed == 0
    finally:
        await _tear_down(run, proxy, redis, task_id)
