"""Back pressure from the outside (DESIGN promise 5): over the queue-depth limit, and
when the broker itself refuses publishes, submissions get 503 with a computed
Retry-After and a problem body, nothing refused is stored, and every task answered 202
still reaches a terminal state once a worker drains the queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import orjson
import pytest

from shared.ids import uuid7
from tests.abuse.conftest import MakeSystem, report
from tests.conftest import Deployment, Tenant, create_tenant
from tests.faults.private import PrivateRedis
from tests.support import eventually, outbox_emptied

SUBMISSIONS = 200
DEPTH_LIMIT = 50
# The backlog (outbox rows due plus the queue's ready messages) is sampled every 250 ms;
# the API counts what it admitted until a sample has seen it, so nothing overshoots but a
# broker's count that lags a confirm. A row the relay moves between the outbox count and
# the queue's is counted twice until the next sample, which refuses a little early.
OVERSHOOT = 3
UNDERSHOOT = 15
PACE_S = 0.01
RETRY_AFTER_CAP_S = 60


async def _submit(
    http: aiohttp.ClientSession, url: str, tenant: Tenant, body: dict[str, Any] | None
) -> tuple[int, dict[str, Any], dict[str, str], float]:
    start = time.perf_counter()
    async with http.post(url, json=body, headers=tenant.headers) as r:
        payload = orjson.loads(await r.read())
        return r.status, payload, dict(r.headers), time.perf_counter() - start


def _assert_polite_503(payload: dict[str, Any], headers: dict[str, str]) -> int:
    """A refusal is a problem body with a numeric Retry-After; return that delay."""
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    assert payload["status"] == 503 and payload["title"], payload
    retry = headers.get("Retry-After", "")
    assert retry.isdigit(), f"Retry-After must be whole seconds: {retry!r}"
    assert 1 <= int(retry) <= RETRY_AFTER_CAP_S, retry
    return int(retry)


async def _states(db: asyncpg.Pool, tenant: Tenant) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT state, count(*) AS n FROM tasks WHERE tenant_id = $1 GROUP BY state", tenant.id
    )
    return {r["state"]: r["n"] for r in rows}


async def _all_succeed(db: asyncpg.Pool, tenant: Tenant, expected: int, within: float) -> None:
    async def done() -> dict[str, int] | None:
        states = await _states(db, tenant)
        return states if states.get("succeeded", 0) == expected else None

    await eventually(done, within=within, interval=0.2, what=f"{expected} tasks to succeed")
    states = await _states(db, tenant)
    assert states == {"succeeded": expected}, states


@pytest.mark.parametrize("relay", ["prompt", "slow"])
async def test_queue_over_depth_limit_gets_503_and_accepted_tasks_complete(
    fresh_namespace: Deployment,
    systems: MakeSystem,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
    relay: str,
) -> None:
    """With no worker and a depth limit of 50, 200 submissions get about 50 202s and 503s
    for the rest; once a worker runs, every accepted task succeeds and 202s resume. A slow
    relay (half a second before each publish) keeps the accepted tasks in the outbox
    across samples: they count all the same."""
    system = systems(fresh_namespace, max_queue_depth=str(DEPTH_LIMIT))
    failpoints = "relay.before_publish=pause" if relay == "slow" else ""
    await system.start_api(rate_limit_per_s="0", failpoints=failpoints)
    tenant = await create_tenant(db)
    url = f"{system.api_url}/v1/tasks"

    async def paced(i: int) -> tuple[int, dict[str, Any], dict[str, str], float]:
        # Spread over about two seconds, so the admissions span several samples.
        await asyncio.sleep(i * PACE_S)
        return await _submit(http, url, tenant, {"type": "demo.noop"})

    results = await asyncio.gather(*(paced(i) for i in range(SUBMISSIONS)))
    statuses = [r[0] for r in results]
    accepted = [r for r in results if r[0] == 202]
    refused = [r for r in results if r[0] == 503]
    print(f"queue-depth flood: {len(accepted)} x 202, {len(refused)} x 503 of {SUBMISSIONS}")
    assert len(accepted) + len(refused) == SUBMISSIONS, sorted(set(statuses))
    assert DEPTH_LIMIT - UNDERSHOOT <= len(accepted) <= DEPTH_LIMIT + OVERSHOOT, len(accepted)
    delays = sorted({_assert_polite_503(r[1], r[2]) for r in refused})
    assert all(r[1]["type"].endswith("/queue-full") for r in refused), refused[0][1]
    print(f"Retry-After values seen: {delays}")
    report("503 (queue full) latency", [r[3] for r in refused])
    # Refused means not stored: the database holds exactly the accepted tasks.
    assert sum((await _states(db, tenant)).values()) == len(accepted)

    await system.start_worker()
    await _all_succeed(db, tenant, len(accepted), within=60)

    async def admitted_again() -> bool:
        status, *_ = await _submit(http, url, tenant, {"type": "demo.noop"})
        return status == 202

    await eventually(admitted_again, within=30, interval=0.3, what="202 after the drain")


async def test_a_batch_is_admitted_only_whole_under_the_limit(
    fresh_namespace: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """A batch counts with all its tasks: one that would take the backlog past the limit
    is refused whole (nothing stored), a smaller one that fits is accepted. One larger
    than the limit itself, which no retry could get in, is a 422 naming the limit."""
    system = systems(fresh_namespace, max_queue_depth=str(DEPTH_LIMIT))
    await system.start_api(rate_limit_per_s="0")
    tenant = await create_tenant(db)
    url = f"{system.api_url}/v1/tasks:batch"

    async def batch(n: int) -> tuple[int, dict[str, Any], dict[str, str], float]:
        return await _submit(http, url, tenant, {"tasks": [{"type": "demo.noop"}] * n})

    status, payload, headers, _ = await batch(DEPTH_LIMIT + 1)
    assert status == 422 and payload["type"].endswith("/batch-too-large"), payload
    assert "LONGHAUL_MAX_QUEUE_DEPTH" in payload["detail"] and "Retry-After" not in headers
    assert (await batch(40))[0] == 202
    status, payload, headers, _ = await batch(DEPTH_LIMIT - 40 + 1)
    assert status == 503, payload
    _assert_polite_503(payload, headers)
    assert sum((await _states(db, tenant)).values()) == 40
    assert (await batch(DEPTH_LIMIT - 40))[0] == 202
    assert sum((await _states(db, tenant)).values()) == DEPTH_LIMIT


async def test_a_retry_or_redrive_that_cannot_be_carried_out_is_told_so_under_back_pressure(
    fresh_namespace: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """With the queue at its limit, a retry or redrive of an id that does not exist, is
    malformed or is another tenant's is a 404; a retry or redrive whose task is not failed
    or cancelled, or a dead letter redriven before, a 409. None of them can be carried
    out, so a 503 telling the client to try again later would be wrong."""
    system = systems(fresh_namespace, max_queue_depth=str(DEPTH_LIMIT))
    await system.start_api(rate_limit_per_s="0")
    tenant, other = await create_tenant(db), await create_tenant(db)
    base = system.api_url
    status, theirs, _, _ = await _submit(http, f"{base}/v1/tasks", other, {"type": "demo.noop"})
    assert status == 202, theirs
    letter = uuid7()
    await db.execute(
        "INSERT INTO dead_letters (id, tenant_id, task_id, reason, body)"
        " VALUES ($1, $2, $3, 'malformed', '')",
        letter,
        other.id,
        UUID(theirs["id"]),
    )
    batch = {"tasks": [{"type": "demo.noop"}] * (DEPTH_LIMIT - 1)}
    status, payload, _, _ = await _submit(http, f"{base}/v1/tasks:batch", tenant, batch)
    assert status == 202, payload
    queued = payload["tasks"][0]["id"]
    unfinished, redriven = uuid7(), uuid7()
    await db.executemany(
        "INSERT INTO dead_letters (id, tenant_id, task_id, reason, body, redriven_at)"
        " VALUES ($1, $2, $3, 'malformed', '', $4)",
        [
            (unfinished, tenant.id, UUID(queued), None),
            (redriven, tenant.id, UUID(queued), datetime.now(UTC)),
        ],
    )

    async def refused() -> bool:
        status, *_ = await _submit(http, f"{base}/v1/tasks", tenant, {"type": "demo.noop"})
        return status == 503

    await eventually(refused, within=10, interval=0.3, what="back pressure")
    for path in (
        f"/v1/tasks/{uuid7()}/retry",
        "/v1/tasks/not-an-id/retry",
        f"/v1/tasks/{theirs['id']}/retry",
        f"/v1/dead-letters/{uuid7()}/redrive",
        "/v1/dead-letters/not-an-id/redrive",
        f"/v1/dead-letters/{letter}/redrive",
    ):
        status, payload, headers, _ = await _submit(http, f"{base}{path}", tenant, None)
        assert status == 404, (path, payload)
        assert payload["status"] == 404 and "Retry-After" not in headers, (path, payload)
    status, payload, headers, _ = await _submit(
        http, f"{base}/v1/tasks/{queued}/retry", tenant, None
    )
    assert status == 409 and "Retry-After" not in headers, payload
    assert payload["type"].endswith("/task-not-retryable"), payload
    for letter_id, why in ((unfinished, "not failed or cancelled"), (redriven, "already")):
        path = f"{base}/v1/dead-letters/{letter_id}/redrive"
        status, payload, headers, _ = await _submit(http, path, tenant, None)
        assert status == 409 and "Retry-After" not in headers, payload
        assert why in payload["detail"], payload
    assert (await _submit(http, f"{base}/v1/tasks", tenant, {"type": "demo.noop"}))[0] == 503


async def test_broker_refusing_publishes_gets_503_and_nothing_accepted_is_lost(
    fresh_namespace: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """When the broker nacks publishes (x-max-length reached, reject-publish) below the
    API's own depth limit, the API answers 503, and every task it answered 202 runs."""
    system = systems(fresh_namespace, queue_max_length="10", max_queue_depth="100000")
    await system.start_api(rate_limit_per_s="0")
    tenant = await create_tenant(db)
    url = f"{system.api_url}/v1/tasks"
    results: list[tuple[int, dict[str, Any], dict[str, str], float]] = []
    # Submit at a steady pace until the API has refused a good number: the refusal
    # starts once the relay's publish was nacked, which takes a flush or two.
    deadline = time.monotonic() + 30
    while sum(r[0] == 503 for r in results) < 40 and time.monotonic() < deadline:
        results += await asyncio.gather(
            *(_submit(http, url, tenant, {"type": "demo.noop"}) for _ in range(4))
        )
    accepted = [r for r in results if r[0] == 202]
    refused = [r for r in results if r[0] == 503]
    print(f"broker refusing: {len(accepted)} x 202, {len(refused)} x 503 of {len(results)}")
    assert len(accepted) + len(refused) == len(results), sorted({r[0] for r in results})
    assert len(accepted) >= 10 and len(refused) >= 40
    for r in refused:
        _assert_polite_503(r[1], r[2])
    assert {r[1]["type"].rsplit("/", 1)[-1] for r in refused} <= {
        "broker-unavailable",
        "queue-full",
    }
    report("503 (broker refusing) latency", [r[3] for r in refused])
    assert sum((await _states(db, tenant)).values()) == len(accepted)

    await system.start_worker()
    await _all_succeed(db, tenant, len(accepted), within=90)
    ids = await db.fetch("SELECT id FROM tasks WHERE tenant_id = $1", tenant.id)
    await outbox_emptied(db, [r["id"] for r in ids])

    # Drained (by whichever relay published the refused rows): admitting again.
    async def admitted() -> bool:
        return (await _submit(http, url, tenant, {"type": "demo.noop"}))[0] == 202

    await eventually(admitted, within=30, interval=0.5, what="the API to admit tasks again")


# ---------------------------------------------------------------- a dependency down


async def test_a_statement_past_its_timeout_is_503_not_500(
    fresh_namespace: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """A row held by a long transaction makes the cancel's UPDATE wait past the
    statement timeout: the database is too slow, which is a 503 like it being away."""
    system = systems(fresh_namespace, io_timeout_s="1")
    await system.start_api(rate_limit_per_s="0")
    tenant = await create_tenant(db)
    url = f"{system.api_url}/v1/tasks"
    status, task, _, _ = await _submit(http, url, tenant, {"type": "demo.noop", "delay_s": 3600})
    assert status == 202, task
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", UUID(task["id"]))
        status, payload, headers, _ = await _submit(
            http, f"{url}/{task['id']}/cancel", tenant, None
        )
    assert status == 503, payload
    _assert_polite_503(payload, headers)
    status, payload, _, _ = await _submit(http, f"{url}/{task['id']}/cancel", tenant, None)
    assert status in (200, 202) and payload["state"] == "cancelled", payload


async def test_redis_down_answers_503_for_tokens_and_keeps_accepting_tasks(
    fresh_namespace: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """With the API's (private) Redis stopped, WebSocket tokens get a prompt 503 with
    Retry-After; submissions are still accepted (Redis is not the truth, the rate
    limit fails open) and run once Redis is back."""
    with PrivateRedis() as server:
        dep = replace(fresh_namespace, redis_url=server.url)
        system = systems(dep, io_timeout_s="1")
        tenant = await create_tenant(db)
        url = f"{system.api_url}/v1/tasks"
        await system.start_api()
        assert (await _submit(http, url, tenant, {"type": "demo.noop"}))[0] == 202
        server.stop()
        tokens = [
            await _submit(http, f"{system.api_url}/v1/ws-tokens", tenant, None) for _ in range(5)
        ]
        for status, payload, headers, _ in tokens:
            assert status == 503, payload
            _assert_polite_503(payload, headers)
        report("503 (Redis down) latency", [t[3] for t in tokens])
        during = [await _submit(http, url, tenant, {"type": "demo.noop"}) for _ in range(5)]
        assert [r[0] for r in during] == [202] * 5, [r[1] for r in during]
        report("202 with Redis down latency", [r[3] for r in during])
        server.start()
        await system.start_worker()
        await _all_succeed(db, tenant, 6, within=60)
