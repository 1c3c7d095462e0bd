"""Dead letters end to end: a crash loop past the queue's delivery limit is dead-lettered
by the broker, stored with its reason, its task failed, and a redrive runs it again."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import ROOT_ENV, Isolated
from tests.support import (
    ServiceProcess,
    System,
    eventually,
    free_port,
    run_cli,
    wait_http_ok,
)


async def test_crash_loop_is_dead_lettered_and_redriven(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """A message that kills every worker that takes it ends as a dead letter, not a loop.
    Its own database: a crashing worker must take no message but this test's."""
    dep, tenant = isolated.deployment, isolated.tenant
    ports = {
        "api_port": str(free_port()),
        "gateway_port": str(free_port()),
        "worker_metrics_port": str(free_port()),
    }
    system = System(dep.env(delivery_limit="2"), ports)
    try:
        await system.start_api()
        url = f"{system.api_url}/v1/tasks"
        # Each crashing worker takes the message and dies before claiming it: the broker
        # counts a delivery each time, and past the limit dead-letters the message.
        task: dict[str, Any] = {}
        crashes = 0
        for _ in range(6):
            port = free_port()
            worker = ServiceProcess(
                "services.worker",
                {
                    **system.env,
                    "LONGHAUL_FAILPOINTS": "worker.before_claim=crash",
                    "LONGHAUL_WORKER_METRICS_PORT": str(port),
                },
                name="crashing-worker",
            )
            if not task:  # the first worker registers the types; then submit
                await wait_http_ok(f"http://127.0.0.1:{port}/healthz", proc=worker)
                async with http.post(url, json={"type": "demo.noop"}, headers=tenant.headers) as r:
                    assert r.status == 202
                    task = await r.json()
            died = await _takes_the_message_and_dies(worker, port)
            worker.terminate()
            if not died:
                break  # nothing left to take: the message is gone from the queue
            assert worker.proc.returncode == 137, worker.output()[-2000:]
            crashes += 1
        assert crashes >= 2
        await system.start_worker()

        async def failed() -> dict[str, Any] | None:
            async with http.get(f"{url}/{task['id']}", headers=tenant.headers) as r:
                body = await r.json()
            return body if body["state"] == "failed" else None

        final = await eventually(failed, within=30, what="the poisoned task to fail")
        assert final["error"]["type"] == "poison" and final["attempts"] == 0
        async with http.get(f"{system.api_url}/v1/dead-letters", headers=tenant.headers) as r:
            letters = (await r.json())["items"]
        letter = next(item for item in letters if item["task_id"] == task["id"])
        assert letter["reason"] == "delivery_limit" and letter["redriven_at"] is None

        # The operator sees it too, with the CLI.
        code, out, err = await run_cli({**ROOT_ENV, **system.env}, "dlq", "list")
        assert code == 0 and letter["id"] in out, err

        redrive = f"{system.api_url}/v1/dead-letters/{letter['id']}/redrive"
        async with http.post(redrive, headers=tenant.headers) as r:
            assert r.status == 202
            body = await r.json()
        assert body["task"]["state"] == "queued" and body["redriven_at"] is not None
        async with http.post(redrive, headers=tenant.headers) as r:
            assert r.status == 409  # once only

        async def succeeded() -> bool:
            async with http.get(f"{url}/{task['id']}", headers=tenant.headers) as r:
                return (await r.json())["state"] == "succeeded"

        await eventually(succeeded, within=30, what="the redriven task to succeed")
    finally:
        system.stop()


async def _takes_the_message_and_dies(worker: ServiceProcess, port: int) -> bool:
    """True when the worker died; False when it was consuming (ready) and lived 10 s
    more: nothing left for it to take. Timed from its readiness, not its start, which a
    slow machine stretches."""
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc=worker)
    except AssertionError:
        if not worker.alive():
            return True
        raise
    try:
        await eventually(lambda: _dead(worker), within=10, what="the worker to crash")
    except AssertionError:
        return False
    return True


async def _dead(proc: ServiceProcess) -> bool:
    return not proc.alive()
