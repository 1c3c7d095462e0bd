"""Plain ``def`` handlers against the real services: their progress reaches a client,
their errors end their attempt as an async handler's do, a blocking one leaves the
worker free to run other tasks beside it, and one that checks ``ctx.cancelled`` stops
on a cancel. (One that ignores it: tests/integration/test_worker_shutdown.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from longhaul import Client
from shared.schemas import TaskState
from tests.conftest import Tenant
from tests.support import System, eventually, timeout

TASKS = ("--tasks", "tests.e2e.thread_tasks")


async def test_a_def_handlers_progress_and_result_reach_the_client(
    system: System, tenant: Tenant
) -> None:
    """Each report made in the thread is an event, in order, with its data; what
    report_progress refused it raised in the thread; a PermanentError fails at once."""
    await system.start_api()
    # Not coalesced: every report is an event.
    await system.start_worker(*TASKS, progress_max_rate_per_s="1000")
    await system.start_gateway()
    async with Client(system.api_url, tenant.key) as client:
        task = await client.submit("threads.report", {"steps": 3})
        refused = await client.submit("threads.refuse")
        events = [e async for e in client.events(task.id)]
        assert [e.seq for e in events] == list(range(1, 1 + len(events)))
        reports = [e for e in events if e.state == TaskState.RUNNING and e.message]
        assert [(e.message, e.data) for e in reports] == [
            ("step 1", {"step": 1}),
            ("step 2", {"step": 2}),
            ("step 3", {"step": 3}),
        ], events
        assert [e.progress for e in reports] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert events[-1].state == TaskState.SUCCEEDED
        done = await client.wait(task.id, timeout_s=timeout(60))
        assert done.result is not None
        assert done.result["thread"].startswith("longhaul-handler"), done.result
        assert "progress data is not JSON" in done.result["refused"], done.result
        failed = await client.wait(refused.id, timeout_s=timeout(60))
        assert failed.state == TaskState.FAILED and failed.error is not None
        assert (failed.attempts, failed.error.type) == (1, "no_customer")


async def test_blocking_def_handlers_leave_the_worker_free(
    system: System, tenant: Tenant, tmp_path: Path
) -> None:
    """Two def handlers block their threads until a file exists, which an async task
    makes, all on one worker: they end only if the loop and a second thread were
    free while they blocked."""
    await system.start_api()
    await system.start_worker(*TASKS)
    await system.start_gateway()
    path = str(tmp_path / "go")
    async with Client(system.api_url, tenant.key) as client:
        waiters = [await client.submit("threads.wait_for", {"path": path}) for _ in range(2)]

        async def both_running() -> bool:
            states = [(await client.get(w.id)).state for w in waiters]
            return states == [TaskState.RUNNING] * 2

        await eventually(both_running, within=30, what="both waiters to run")
        touch = await client.submit("threads.touch", {"path": path})
        # Well within the waiters' 120 s timeout: a loop they blocked ran nothing.
        ended = await asyncio.gather(
            *(client.wait(t.id, timeout_s=timeout(60)) for t in [touch, *waiters])
        )
        assert [t.state for t in ended] == [TaskState.SUCCEEDED] * 3, ended
        threads = [t.result for t in ended[1:]]
        assert all(str(t).startswith("longhaul-handler") for t in threads), threads
        assert threads[0] != threads[1], threads


async def test_a_def_handler_that_checks_ctx_cancelled_stops_on_a_cancel(
    system: System, tenant: Tenant, tmp_path: Path
) -> None:
    """The cancel sets ctx.cancelled; the handler returns and the task ends cancelled,
    long before the 60 s grace it would be given up after."""
    await system.start_api()
    worker = await system.start_worker(*TASKS, cancel_grace_s="60")
    await system.start_gateway()
    path = tmp_path / "told"
    async with Client(system.api_url, tenant.key) as client:
        task = await client.submit("threads.cooperative", {"path": str(path)})

        async def running() -> bool:
            return (await client.get(task.id)).state == TaskState.RUNNING

        await eventually(running, within=30, what="the task to run")
        await client.cancel(task.id)
        ended = await client.wait(task.id, timeout_s=timeout(30))
        assert ended.state == TaskState.CANCELLED
    assert path.read_text() == "told"
    assert "ignored cancellation" not in worker.output(), worker.output()[-2000:]
