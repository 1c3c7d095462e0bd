"""The Python client against the real services: a task submitted, followed live to its
result, failed, cancelled and run again; the API's refusals raised as problems; the
synchronous client shared by threads."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from longhaul import Client, LonghaulError, SyncClient
from shared.ids import uuid7
from shared.schemas import Task, TaskState
from tests.conftest import Tenant
from tests.support import System


async def test_a_task_is_followed_live_to_its_result(system: System, tenant: Tenant) -> None:
    await system.start_api()
    await system.start_worker()
    await system.start_gateway()
    async with Client(system.api_url, tenant.key) as client:
        task = await client.submit("demo.sleep", {"seconds": 0.6, "steps": 3}, timeout_s=30)
        assert (task.state, task.timeout_s) == (TaskState.QUEUED, 30.0)
        events = [e async for e in client.events(task.id)]
        assert [e.seq for e in events] == list(range(1, 1 + len(events)))
        assert events[-1].state == TaskState.SUCCEEDED
        assert [e.progress for e in events if e.state == TaskState.RUNNING][-1] == 1.0
        done = await client.wait(task.id, timeout_s=60)
        assert done.result == {"slept": 0.6}
        assert task.id in {t.id async for t in client.tasks(state="succeeded", page=2)}


async def test_failure_cancel_and_retry_end_as_the_contract_says(
    system: System, tenant: Tenant
) -> None:
    await system.start_api()
    await system.start_worker()
    await system.start_gateway()
    async with Client(system.api_url, tenant.key) as client:
        failing = await client.submit("demo.fail", {"message": "no luck"})
        failed = await client.wait(failing.id, timeout_s=60)
        assert failed.state == TaskState.FAILED
        assert failed.error is not None and failed.error.message == "no luck"

        long = await client.submit("demo.sleep", {"seconds": 60, "steps": 60})
        # Left early: aclosing ends the stream's response now, not at collection.
        async with contextlib.aclosing(client.events(long.id)) as events:
            async for event in events:
                if event.state == TaskState.RUNNING:
                    break
        await client.cancel(long.id)
        cancelled = await client.wait(long.id, timeout_s=60)
        assert cancelled.state == TaskState.CANCELLED
        with pytest.raises(LonghaulError) as ended:
            await client.cancel(long.id)
        assert ended.value.status == 409 and ended.value.request_id

        again = await client.retry(long.id)
        assert again.id == long.id and again.state == TaskState.QUEUED
        await client.cancel(long.id)
        assert (await client.wait(long.id, timeout_s=60)).state == TaskState.CANCELLED


async def test_a_refused_request_is_a_problem_with_its_errors(
    system: System, tenant: Tenant
) -> None:
    await system.start_api()
    async with Client(system.api_url, tenant.key) as client:
        with pytest.raises(LonghaulError) as unknown:
            await client.submit("no.such.type")
        assert unknown.value.status == 422
        assert [e["loc"] for e in unknown.value.errors] == [["body", "type"]]
    async with Client(system.api_url, "lh_live_aaaaaaaaaaaa_wrong") as stranger:
        with pytest.raises(LonghaulError) as refused:
            await asyncio.wait_for(stranger.get(uuid7()), 30)
        assert refused.value.status == 401


async def test_threads_share_a_sync_client(system: System, tenant: Tenant) -> None:
    """Eight threads submit through one SyncClient and each waits for its own result
    while another follows a task's events as a plain iterator."""
    await system.start_api()
    await system.start_worker()
    await system.start_gateway()
    seconds = [0.1 * n for n in range(1, 9)]
    loop = asyncio.get_running_loop()
    with SyncClient(system.api_url, tenant.key) as client, ThreadPoolExecutor(9) as pool:

        def run(s: float) -> Task:
            return client.wait(client.submit("demo.sleep", {"seconds": s, "steps": 2}).id, 60)

        def follow() -> list[tuple[int, TaskState]]:
            task = client.submit("demo.sleep", {"seconds": 0.4, "steps": 2})
            return [(e.seq, e.state) for e in client.events(task.id)]

        followed = loop.run_in_executor(pool, follow)
        done = await asyncio.gather(*(loop.run_in_executor(pool, run, s) for s in seconds))
        events = await followed
    assert [t.result for t in done] == [{"slept": s} for s in seconds]
    assert [seq for seq, _ in events] == list(range(1, 1 + len(events)))
    assert events[-1][1] == TaskState.SUCCEEDED
