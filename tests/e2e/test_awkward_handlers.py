"""Handlers that misbehave, against real processes: arrays as results, results and
progress data that are not JSON, a handler ignoring its cancellation, sys.exit(), a
blocking call. Each ends its own task as README says and leaves the worker running."""

from __future__ import annotations

from functools import partial
from typing import Any

import aiohttp

from tests.conftest import Tenant
from tests.support import System, eventually

TERMINAL = {"succeeded", "failed", "cancelled"}


async def _submit(http: aiohttp.ClientSession, system: System, tenant: Tenant, body: Any) -> str:
    async with http.post(f"{system.api_url}/v1/tasks", json=body, headers=tenant.headers) as r:
        assert r.status == 202, await r.text()
        task_id: str = (await r.json())["id"]
        return task_id


async def _ended(
    http: aiohttp.ClientSession, system: System, tenant: Tenant, task_id: str
) -> dict[str, Any] | None:
    async with http.get(f"{system.api_url}/v1/tasks/{task_id}", headers=tenant.headers) as r:
        task: dict[str, Any] = await r.json()
    return task if task["state"] in TERMINAL else None


async def test_misbehaving_handlers_end_their_own_tasks(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    await system.start_api()
    worker = await system.start_worker("--tasks", "tests.e2e.awkward_tasks", cancel_grace_s="1")
    submit = partial(_submit, http, system, tenant)
    values: list[Any] = [[1, 2, 3], [], [{"a": 1}, {"b": 2}], [[1], [2]], "text", 5, None]
    # Submitted together: their successes share statements.
    echoes = [await submit({"type": "awkward.echo", "args": {"value": v}}) for v in values]
    opaque = await submit({"type": "awkward.opaque"})
    reports = await submit({"type": "awkward.reports"})
    exits = await submit({"type": "awkward.exit"})
    blocks = await submit({"type": "awkward.block", "args": {"seconds": 1.0}})
    stubborn = await submit({"type": "awkward.stubborn", "args": {"seconds": 120}})

    async def ended(task_id: str) -> dict[str, Any]:
        return await eventually(partial(_ended, http, system, tenant, task_id), within=30)

    for task_id, value in zip(echoes, values, strict=True):
        task = await ended(task_id)
        assert (task["state"], task["result"]) == ("succeeded", value), task
    task = await ended(opaque)
    assert (task["state"], task["error"]["type"]) == ("failed", "invalid_result"), task
    task = await ended(reports)
    assert task["state"] == "succeeded", task
    assert "progress data is not JSON" in task["result"]["refused"]
    task = await ended(exits)
    assert task["state"] == "failed" and "SystemExit" in task["error"]["message"], task
    task = await ended(blocks)
    assert (task["state"], task["error"]["type"]) == ("failed", "timeout"), task

    # Cancelled, it goes on (two minutes in all): given up after the 1 s grace, not at
    # its 60 s timeout.
    async def running() -> bool:
        async with http.get(f"{system.api_url}/v1/tasks/{stubborn}", headers=tenant.headers) as r:
            return bool((await r.json())["state"] == "running")

    await eventually(running, within=30, what="the stubborn task to run")
    async with http.post(
        f"{system.api_url}/v1/tasks/{stubborn}/cancel", headers=tenant.headers
    ) as r:
        assert r.status == 202
    task = await eventually(partial(_ended, http, system, tenant, stubborn), within=5)
    assert task["state"] == "cancelled"
    assert worker.alive(), worker.output()[-2000:]
    # Stopping, the worker does not wait for the handler it gave up on (SIGKILL, -9,
    # if it does not exit in time).
    assert worker.terminate(wait=20) == 0, worker.output()[-2000:]
    assert "handlers that ignored cancellation still running" in worker.output()
