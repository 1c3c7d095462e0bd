"""A rolling deploy that adds a task type: a worker of the old version (without the
type) shares the queue with one of the new version. The old one passes the type's
messages on instead of failing the tasks, and fails them only once no worker has run
the type for a lease."""

from __future__ import annotations

from functools import partial
from typing import Any

import aiohttp

from tests.conftest import Isolated
from tests.support import System, eventually, free_port, worker_metric

LEASE_S = "3"  # heartbeats each second; a type no worker ran for 3 s is nobody's


async def test_a_worker_lacking_a_type_passes_its_tasks_on(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    dep, tenant = isolated.deployment, isolated.tenant
    ports = {
        "api_port": str(free_port()),
        "gateway_port": str(free_port()),
        "worker_metrics_port": str(free_port()),
    }
    system = System(dep.env(lease_s=LEASE_S), ports)
    try:
        await system.start_api()
        await system.start_worker()  # the old version: built-in types only
        new = await system.start_worker("--tasks", "tests.e2e.user_tasks")
        url = f"{system.api_url}/v1/tasks"

        async def submit(text: str) -> str:
            body = {"type": "user.reverse", "args": {"text": text}}
            async with http.post(url, json=body, headers=tenant.headers) as r:
                assert r.status == 202, await r.text()
                task_id: str = (await r.json())["id"]
                return task_id

        async def ended(task_id: str) -> dict[str, Any] | None:
            async with http.get(f"{url}/{task_id}", headers=tenant.headers) as r:
                task: dict[str, Any] = await r.json()
            return task if task["state"] in ("succeeded", "failed", "cancelled") else None

        # The broker shares deliveries between the two consumers: submit until the
        # old worker has had some of them.
        ids: list[str] = []

        async def old_worker_passed_some_on() -> bool:
            ids.extend([await submit(f"t{len(ids) + i}") for i in range(10)])
            return await worker_metric(system, http, "longhaul_worker_passed_on_total") > 0

        await eventually(
            old_worker_passed_some_on, within=30, interval=0.5, what="a message passed on"
        )
        for n, task_id in enumerate(ids):
            task = await eventually(partial(ended, task_id), within=30, what="the task to end")
            assert task["state"] == "succeeded", task
            assert task["result"] == {"reversed": f"t{n}"[::-1], "attempt": 1}
            assert task["attempts"] == 1  # a pass-on uses no attempt

        # The new version's worker goes away: once no worker has run the type for a
        # lease, the old one fails the task (it must end) and keeps it to redrive.
        new.terminate()
        lost = await submit("nobody")
        task = await eventually(partial(ended, lost), within=30, what="the task to fail")
        assert task["state"] == "failed" and task["error"]["type"] == "unknown_type", task
        async with http.get(f"{system.api_url}/v1/dead-letters", headers=tenant.headers) as r:
            letters = (await r.json())["items"]
        assert [item["reason"] for item in letters if item["task_id"] == lost] == ["unknown_type"]
    finally:
        system.stop()
