"""Back pressure on the store of delayed tasks against the real services (the API as a
process, on a database of its own): up to LONGHAUL_MAX_DELAYED_TASKS a task with a
delay is accepted, past it a submission carrying one gets 503 delayed-full and is not
stored, a batch that would cross it is refused whole, and tasks without a delay are
still accepted."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from tests.conftest import Isolated
from tests.support import System, eventually, register_task_types

LIMIT = 3
LATER = {"type": "demo.noop", "delay_s": 3600}
NOW = {"type": "demo.noop"}


async def _post(
    http: aiohttp.ClientSession, isolated: Isolated, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(url, json=body, headers=isolated.tenant.headers) as r:
        return r.status, orjson.loads(await r.read()), dict(r.headers)


async def _stored(isolated: Isolated) -> tuple[int, int]:
    """The tenant's tasks, and the outbox rows not yet due."""
    tasks = await isolated.db.fetchval(
        "SELECT count(*) FROM tasks WHERE tenant_id = $1", isolated.tenant.id
    )
    later = await isolated.db.fetchval("SELECT count(*) FROM outbox WHERE available_at > now()")
    return tasks, later


def _assert_delayed_full(status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
    assert status == 503, payload
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    assert payload["status"] == 503 and payload["type"].endswith("/delayed-full"), payload
    retry = headers.get("Retry-After", "")
    assert retry.isdigit() and int(retry) >= 1, retry


async def test_delayed_tasks_past_the_limit_are_refused_and_not_stored(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """With a limit of 3: a batch of four delayed tasks is a 422 (it could never fit),
    two delayed tasks are accepted, a batch of two more is refused whole, a batch of one
    delayed and one not fills the store, the next delayed task is refused while one
    without a delay is accepted; another API process, which admitted none of them,
    counts them from the outbox and refuses too."""
    env = isolated.deployment.env(max_delayed_tasks=str(LIMIT), rate_limit_per_s="0")
    await register_task_types(env)
    system, other = System(env), System(env)
    try:
        await system.start_api()
        single, batch = f"{system.api_url}/v1/tasks", f"{system.api_url}/v1/tasks:batch"
        status, payload, headers = await _post(http, isolated, batch, {"tasks": [LATER] * 4})
        assert status == 422 and payload["type"].endswith("/batch-too-large"), payload
        assert "LONGHAUL_MAX_DELAYED_TASKS" in payload["detail"] and "Retry-After" not in headers
        for _ in range(2):
            status, payload, _ = await _post(http, isolated, single, LATER)
            assert status == 202, payload
        _assert_delayed_full(*await _post(http, isolated, batch, {"tasks": [LATER, LATER]}))
        assert await _stored(isolated) == (2, 2)
        status, payload, _ = await _post(http, isolated, batch, {"tasks": [LATER, NOW]})
        assert status == 202, payload
        _assert_delayed_full(*await _post(http, isolated, single, LATER))
        assert await _stored(isolated) == (4, LIMIT)
        status, payload, _ = await _post(http, isolated, single, NOW)
        assert status == 202, payload
        status, payload, _ = await _post(http, isolated, batch, {"tasks": [NOW, NOW]})
        assert status == 202, payload

        await other.start_api()

        async def counted() -> bool:
            async with http.get(f"{other.api_url}/metrics") as r:
                return f"longhaul_api_outbox_delayed {float(LIMIT)}" in await r.text()

        await eventually(counted, within=10, what="the other API to count the delayed rows")
        _assert_delayed_full(*await _post(http, isolated, f"{other.api_url}/v1/tasks", LATER))
        status, payload, _ = await _post(http, isolated, f"{other.api_url}/v1/tasks", NOW)
        assert status == 202, payload
        assert (await _stored(isolated))[1] == LIMIT
    finally:
        other.stop()
        system.stop()
