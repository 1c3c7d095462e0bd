"""The core pipeline end to end: api and worker as real processes, tasks over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import orjson
import pytest

from shared.schemas import TaskRequest
from tests.conftest import Deployment, Isolated, Tenant, create_tenant
from tests.support import System, eventually, outbox_emptied

JSON = {"Content-Type": "application/json"}
# demo.sleep's args schema as its worker registers it (defaults 5.0 seconds, 10 steps).
SLEEP_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "seconds": {"type": "number", "minimum": 0, "maximum": 86400, "default": 5.0},
        "steps": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 10},
    },
}


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    tenant: Tenant,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.post(url, json=body, headers={**tenant.headers, **(headers or {})}) as r:
        return r.status, await r.json(content_type=None), r.headers


async def _all_terminal(db: asyncpg.Pool, ids: list[str]) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT state, count(*) AS n FROM tasks WHERE id = ANY($1::uuid[]) GROUP BY state", ids
    )
    return {r["state"]: r["n"] for r in rows}


async def test_thousand_noop_tasks_single_and_batch_all_succeed(
    system: System, http: aiohttp.ClientSession, tenant: Tenant, db: asyncpg.Pool
) -> None:
    """500 single submissions and 500 in batches all reach succeeded, each answered 202."""
    await system.start_api(rate_limit_per_s="0")
    await system.start_worker()
    url = f"{system.api_url}/v1/tasks"
    sem = asyncio.Semaphore(32)

    async def one() -> str:
        async with sem:
            status, body, headers = await _post(http, url, tenant, {"type": "demo.noop"})
            assert status == 202, body
            assert headers["Location"] == f"/v1/tasks/{body['id']}"
            return str(body["id"])

    single = await asyncio.gather(*(one() for _ in range(500)))
    batched: list[str] = []
    for _ in range(5):
        status, body, _ = await _post(
            http, f"{url}:batch", tenant, {"tasks": [{"type": "demo.noop"}] * 100}
        )
        assert status == 202, body
        assert [t["state"] for t in body["tasks"]] == ["queued"] * 100
        batched += [t["id"] for t in body["tasks"]]
    ids = single + batched
    assert len(set(ids)) == 1000

    async def done() -> bool:
        counts = await _all_terminal(db, ids)
        return counts.get("succeeded", 0) == 1000

    await eventually(done, within=90, interval=0.25, what="1000 tasks to succeed")
    rows = await db.fetch(
        "SELECT result, attempts, progress FROM tasks WHERE id = ANY($1::uuid[])", ids
    )
    assert all(
        r["result"] == {"ok": True} and r["attempts"] == 1 and r["progress"] == 1.0 for r in rows
    )
    await outbox_emptied(db, ids)


async def test_task_lifecycle_is_visible_over_rest(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    """A demo.sleep task goes queued → running → succeeded with progress and a result."""
    await system.start_api()
    await system.start_worker()
    status, task, _ = await _post(
        http,
        f"{system.api_url}/v1/tasks",
        tenant,
        {"type": "demo.sleep", "args": {"seconds": 0.6, "steps": 3}},
    )
    assert status == 202
    assert task["state"] == "queued" and task["last_seq"] == 1 and task["attempts"] == 0
    seen: set[str] = set()

    async def finished() -> dict[str, Any] | None:
        async with http.get(f"{system.api_url}/v1/tasks/{task['id']}", headers=tenant.headers) as r:
            body = await r.json()
        seen.add(body["state"])
        return body if body["state"] == "succeeded" else None

    final = await eventually(finished, within=30, what="demo.sleep to succeed")
    assert "running" in seen or final["started_at"] is not None
    assert final["result"] == {"slept": 0.6}
    assert final["progress"] == 1.0 and final["message"] == "step 3 of 3"
    # queued, running, 3 progress reports, succeeded (reports may be coalesced, never below 1).
    assert 4 <= final["last_seq"] <= 6
    assert final["finished_at"] >= final["started_at"] >= final["created_at"]


async def test_failures_retries_and_user_task_module(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    """demo.fail fails at once, demo.flaky retries to success with its own backoff, a task
    past its timeout_s fails as timeout, and a user module's type runs."""
    await system.start_api()
    # The worker's default backoff (30 s base) would stall this test: the flaky task's
    # own backoff overrides it.
    await system.start_worker("--tasks", "tests.e2e.user_tasks", retry_base_s="30")
    url = f"{system.api_url}/v1/tasks"
    _, failing, _ = await _post(http, url, tenant, {"type": "demo.fail", "args": {"message": "no"}})
    _, flaky, _ = await _post(
        http,
        url,
        tenant,
        {
            "type": "demo.flaky",
            "args": {"fail_times": 2},
            "backoff": {"base_s": 0.02, "cap_s": 0.1},
        },
    )
    _, slow, _ = await _post(
        http,
        url,
        tenant,
        {"type": "demo.sleep", "args": {"seconds": 30}, "timeout_s": 0.3, "max_attempts": 1},
    )
    status, user, _ = await _post(
        http, url, tenant, {"type": "user.reverse", "args": {"text": "abc"}}
    )
    assert status == 202, user
    # The type's @task(max_attempts=1, timeout_s=0.3) for a request that sets neither;
    # a request's own values win.
    _, strict, _ = await _post(http, url, tenant, {"type": "user.strict", "args": {"seconds": 30}})
    _, lenient, _ = await _post(
        http,
        url,
        tenant,
        {"type": "user.strict", "args": {"seconds": 0.5}, "timeout_s": 10, "max_attempts": 3},
    )
    assert (user["max_attempts"], strict["max_attempts"], lenient["max_attempts"]) == (2, 1, 3)

    async def terminal(task_id: str) -> dict[str, Any] | None:
        async with http.get(f"{url}/{task_id}", headers=tenant.headers) as r:
            body = await r.json()
        return body if body["state"] in {"succeeded", "failed", "cancelled"} else None

    failed = await eventually(lambda: terminal(failing["id"]), within=30, what="demo.fail")
    assert failed["state"] == "failed" and failed["attempts"] == 1
    assert failed["error"] == {"type": "demo_failure", "message": "no", "retryable": False}
    retried = await eventually(lambda: terminal(flaky["id"]), within=30, what="demo.flaky")
    assert retried["state"] == "succeeded" and retried["attempts"] == 3
    assert retried["result"] == {"attempts": 3}
    timed_out = await eventually(lambda: terminal(slow["id"]), within=30, what="the timeout")
    assert timed_out["state"] == "failed" and timed_out["error"]["type"] == "timeout"
    done = await eventually(lambda: terminal(user["id"]), within=30, what="user.reverse")
    assert done["result"] == {"reversed": "cba", "attempt": 1}
    cut = await eventually(lambda: terminal(strict["id"]), within=30, what="user.strict")
    assert (cut["state"], cut["error"]["type"], cut["attempts"]) == ("failed", "timeout", 1)
    slept = await eventually(lambda: terminal(lenient["id"]), within=30, what="user.strict")
    assert (slept["state"], slept["result"]) == ("succeeded", {"slept": 0.5})
    # The user's args model is enforced by the API before anything is queued.
    status, problem, _ = await _post(http, url, tenant, {"type": "user.reverse", "args": {}})
    assert status == 422 and problem["errors"][0]["loc"][:2] == ["body", "args"]


async def test_bad_input_gets_the_contract_status(
    system: System, http: aiohttp.ClientSession, tenant: Tenant, deployment: Deployment
) -> None:
    """Every bad input of the contract is refused with its status and a problem body."""
    await system.start_api(max_body_bytes="65536")
    await system.start_worker()
    url = f"{system.api_url}/v1/tasks"
    auth = tenant.headers

    async def status_of(method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with http.request(method, f"{system.api_url}{path}", **kw) as r:
            body = await r.json(content_type=None)
            if r.status >= 400:
                assert r.content_type == "application/problem+json", (path, r.content_type)
                assert body["status"] == r.status and body["title"]
            return r.status, body

    cases: list[tuple[int, str, str, dict[str, Any]]] = [
        (401, "POST", "/v1/tasks", {"json": {"type": "demo.noop"}}),
        (
            401,
            "POST",
            "/v1/tasks",
            {"json": {"type": "demo.noop"}, "headers": {"Authorization": "Bearer lh_x_abc_def"}},
        ),
        (401, "GET", "/v1/tasks", {"headers": {"Authorization": "Basic Zm9vOmJhcg=="}}),
        (400, "POST", "/v1/tasks", {"data": b"{not json", "headers": {**auth, **JSON}}),
        (
            415,
            "POST",
            "/v1/tasks",
            {
                "data": b"type=demo.noop",
                "headers": {**auth, "Content-Type": "application/x-www-form-urlencoded"},
            },
        ),
        (
            413,
            "POST",
            "/v1/tasks",
            {"json": {"type": "demo.noop", "args": {"x": "y" * 70000}}, "headers": auth},
        ),
        (422, "POST", "/v1/tasks", {"json": {"type": "no.such.type"}, "headers": auth}),
        (422, "POST", "/v1/tasks", {"json": {"type": "demo.noop", "surprise": 1}, "headers": auth}),
        (422, "POST", "/v1/tasks", {"json": {"args": {}}, "headers": auth}),
        (
            422,
            "POST",
            "/v1/tasks",
            {"json": {"type": "demo.sleep", "args": {"steps": "many"}}, "headers": auth},
        ),
        (
            422,
            "POST",
            "/v1/tasks",
            {"json": {"type": "demo.noop", "max_attempts": 0}, "headers": auth},
        ),
        (422, "POST", "/v1/tasks", {"json": ["demo.noop"], "headers": auth}),
        (422, "POST", "/v1/tasks:batch", {"json": {"tasks": []}, "headers": auth}),
        (
            422,
            "POST",
            "/v1/tasks:batch",
            {"json": {"tasks": [{"type": "demo.noop"}] * 1001}, "headers": auth},
        ),
        (422, "GET", "/v1/tasks?limit=501", {"headers": auth}),
        # NUL is valid JSON but not storable in PostgreSQL: refused, not a 500.
        (
            422,
            "POST",
            "/v1/tasks",
            {"json": {"type": "demo.fail", "args": {"message": "a\x00b"}}, "headers": auth},
        ),
        (422, "GET", "/v1/tasks?type=demo%00noop", {"headers": auth}),
        (422, "GET", "/v1/tasks?type=demo.noop%0A", {"headers": auth}),
        (422, "GET", "/v1/tasks?state=sleeping", {"headers": auth}),
        (422, "GET", "/v1/tasks?cursor=%%%", {"headers": auth}),
        # Each takes one value: a second is refused, not dropped.
        (422, "GET", "/v1/tasks?state=failed&state=cancelled", {"headers": auth}),
        (422, "GET", "/v1/dead-letters?limit=1&limit=2", {"headers": auth}),
        (404, "GET", "/v1/tasks/not-a-uuid", {"headers": auth}),
        (404, "GET", "/v1/tasks/01a20972-cad6-7410-8006-6a92312e6992", {"headers": auth}),
        (405, "DELETE", "/v1/tasks", {"headers": auth}),
    ]
    for expected, method, path, kw in cases:
        status, body = await status_of(method, path, **kw)
        assert status == expected, (method, path, status, body)

    # What is wrong, in the client's terms: no class of ours, no surrogates not sent.
    for raw in (b"[]", b"null"):
        status, body = await status_of("POST", "/v1/tasks", data=raw, headers={**auth, **JSON})
        assert (status, body["detail"]) == (422, "the body must be a JSON object"), body
        assert body["errors"] == [{"loc": ["body"], "msg": "the body must be a JSON object"}]
    raw = b'{"type": "demo.noop", "args": {"x": "\xff"}}'
    status, body = await status_of("POST", "/v1/tasks", data=raw, headers={**auth, **JSON})
    assert status == 400 and "not valid UTF-8" in body["detail"], body

    # A batch names its bad items by index, and accepts none of them.
    before = await _count(deployment)
    status, body = await status_of(
        "POST",
        "/v1/tasks:batch",
        headers=auth,
        json={"tasks": [{"type": "demo.noop"}, {"type": "nope"}, {"type": "demo.noop", "zz": 1}]},
    )
    assert status == 422
    assert {tuple(e["loc"][:3]) for e in body["errors"]} == {
        ("body", "tasks", 1),
        ("body", "tasks", 2),
    }
    assert await _count(deployment) == before

    # Idempotency: same key and body → the same task with 200; another body → 422.
    key = {"Idempotency-Key": "order-42"}
    s1, t1, _ = await _post(http, url, tenant, {"type": "demo.noop"}, key)
    s2, t2, h2 = await _post(http, url, tenant, {"type": "demo.noop"}, key)
    s3, p3, _ = await _post(http, url, tenant, {"type": "demo.noop", "priority": 3}, key)
    assert (s1, s2, s3) == (202, 200, 422)
    assert t1["id"] == t2["id"] and h2["Idempotent-Replayed"] == "true"
    assert p3["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    s4, _, _ = await _post(http, url, tenant, {"type": "demo.noop"}, {"Idempotency-Key": "x" * 256})
    assert s4 == 422


async def _count(deployment: Deployment) -> int:
    conn = await asyncpg.connect(deployment.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM tasks"))
    finally:
        await conn.close()


async def _stored_under(db: asyncpg.Pool, tenant: Tenant, key: str) -> int:
    """How many of the tenant's tasks a request under ``key`` stored (a batch's tasks
    after the first are under the key, a line feed and their index)."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM tasks WHERE tenant_id = $1"
            " AND (idempotency_key = $2 OR idempotency_key LIKE $2 || E'\\n%')",
            tenant.id,
            key,
        )
    )


async def test_a_batch_under_an_idempotency_key_is_stored_once_and_whole(
    system: System, http: aiohttp.ClientSession, tenant: Tenant, db: asyncpg.Pool
) -> None:
    """A repeated batch answers 200 with the same tasks in order; another batch or a
    single request under its key is a 422 that stores nothing; racing batches under
    one key, two different ones among them, store exactly one of them, whole; a batch
    whose tasks were partly deleted is a 409."""
    await system.start_api()
    url = f"{system.api_url}/v1/tasks"
    batch = {
        "tasks": [
            {"type": "demo.noop"},
            {"type": "demo.sleep", "args": {"seconds": 0}, "priority": 3},
            {"type": "demo.noop", "delay_s": 3600},
        ]
    }
    key = {"Idempotency-Key": "batch-1"}
    s1, b1, _ = await _post(http, f"{url}:batch", tenant, batch, key)
    s2, b2, h2 = await _post(http, f"{url}:batch", tenant, batch, key)
    assert (s1, s2) == (202, 200), (b1, b2)
    assert [t["id"] for t in b2["tasks"]] == [t["id"] for t in b1["tasks"]]
    assert [t["priority"] for t in b2["tasks"]] == [0, 3, 0]
    assert h2["Idempotent-Replayed"] == "true"

    other = {"tasks": batch["tasks"][:2]}
    s3, p3, _ = await _post(http, f"{url}:batch", tenant, other, key)
    s4, p4, _ = await _post(http, url, tenant, {"type": "demo.noop"}, key)
    assert (s3, s4) == (422, 422), (p3, p4)
    assert p3["errors"][0]["loc"] == p4["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    s5, _, _ = await _post(http, url, tenant, {"type": "demo.noop"}, {"Idempotency-Key": "one"})
    s6, _, _ = await _post(http, f"{url}:batch", tenant, batch, {"Idempotency-Key": "one"})
    assert (s5, s6) == (202, 422)
    assert await _stored_under(db, tenant, "batch-1") == 3
    assert await _stored_under(db, tenant, "one") == 1

    # Ten of each of two batches race under one key: the first to commit is stored,
    # whole, and every other request is its replay or a 422.
    five = {"tasks": [{"type": "demo.noop", "priority": i} for i in range(5)]}
    four = {"tasks": five["tasks"][:4]}
    race = {"Idempotency-Key": "batch-race"}
    results = await asyncio.gather(
        *(_post(http, f"{url}:batch", tenant, b, race) for _ in range(10) for b in (five, four))
    )
    [(_, won, _)] = [r for r in results if r[0] == 202]
    winner = [t["id"] for t in won["tasks"]]
    assert await _stored_under(db, tenant, "batch-race") == len(winner)
    for status, body, _ in results:
        if status == 200:
            assert [t["id"] for t in body["tasks"]] == winner
        else:
            assert status in (202, 422), (status, body)
    replays = sum(1 for r in results if r[0] == 200)
    assert replays == 9, [r[0] for r in results]  # the winner's nine twins

    # Task retention deleted one of the first batch's tasks: it cannot be replayed whole.
    await db.execute("DELETE FROM tasks WHERE id = $1", UUID(b1["tasks"][1]["id"]))
    s7, p7, _ = await _post(http, f"{url}:batch", tenant, batch, key)
    assert s7 == 409 and "1 of the 3" in p7["detail"], p7


async def test_concurrent_identical_idempotent_requests_create_one_task(
    system: System, http: aiohttp.ClientSession, tenant: Tenant, db: asyncpg.Pool
) -> None:
    """Twenty identical requests racing with one Idempotency-Key create exactly one task."""
    await system.start_api()
    url = f"{system.api_url}/v1/tasks"
    results = await asyncio.gather(
        *(
            _post(http, url, tenant, {"type": "demo.noop"}, {"Idempotency-Key": "race-1"})
            for _ in range(20)
        )
    )
    statuses = sorted(r[0] for r in results)
    assert statuses.count(202) == 1 and statuses.count(200) == 19, statuses
    assert len({r[1]["id"] for r in results}) == 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM tasks WHERE tenant_id = $1 AND idempotency_key = 'race-1'",
            tenant.id,
        )
        == 1
    )


async def test_an_idempotency_key_compares_requests_as_their_tasks_will_run(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """For a type with its own max_attempts (3), {"type": T} repeats as the request
    setting 3 (200) and not as the one setting the contract's 5 (422; its hash as sent
    matched). Args compare as the handler gets them: their schema's defaults filled in,
    1.0 the same as 1. Fingerprints stored before the upgrade (a bare sha256 of the
    request as sent; version 1, args as sent) still replay. Its own database: the types
    and tasks reach no other test."""
    db, tenant = isolated.db, isolated.tenant
    await db.execute(
        "INSERT INTO task_types (name, args_schema, max_attempts, seen_at)"
        " VALUES ('idem.three', '{}', 3, now())"
    )
    await db.execute(
        "INSERT INTO task_types (name, args_schema, seen_at) VALUES ('idem.sleep', $1, now())",
        SLEEP_SCHEMA,
    )
    system = System(isolated.deployment.env())
    try:
        await system.start_api()
        url = f"{system.api_url}/v1/tasks"
        key = {"Idempotency-Key": "typed-1"}
        s1, t1, _ = await _post(http, url, tenant, {"type": "idem.three"}, key)
        assert (s1, t1["max_attempts"]) == (202, 3), t1
        s2, t2, h2 = await _post(http, url, tenant, {"type": "idem.three", "max_attempts": 3}, key)
        assert s2 == 200 and t2["id"] == t1["id"] and h2["Idempotent-Replayed"] == "true"
        s3, p3, _ = await _post(http, url, tenant, {"type": "idem.three", "max_attempts": 5}, key)
        assert s3 == 422, p3
        assert p3["errors"][0]["loc"] == ["header", "Idempotency-Key"]

        # A row as the API before the upgrade stored it, then the client's retry.
        old_key = {"Idempotency-Key": "stored-before-upgrade"}
        s4, t4, _ = await _post(http, url, tenant, {"type": "idem.three"}, old_key)
        assert s4 == 202, t4
        sent = TaskRequest.model_validate({"type": "idem.three"}).model_dump(mode="json")
        old = hashlib.sha256(orjson.dumps(sent, option=orjson.OPT_SORT_KEYS)).digest()
        await db.execute("UPDATE tasks SET request_hash = $1 WHERE id = $2", old, UUID(t4["id"]))
        s5, t5, h5 = await _post(http, url, tenant, {"type": "idem.three"}, old_key)
        assert s5 == 200 and t5["id"] == t4["id"] and h5["Idempotent-Replayed"] == "true"
        s6, _, _ = await _post(http, url, tenant, {"type": "idem.three", "priority": 1}, old_key)
        assert s6 == 422

        async def repeat(key: str, first: Any, *then: tuple[Any, int]) -> None:
            s, t, _ = await _post(http, url, tenant, first, {"Idempotency-Key": key})
            assert s == 202, t
            for body, status in then:
                s, again, _ = await _post(http, url, tenant, body, {"Idempotency-Key": key})
                assert s == status, (body, again)
                assert status != 200 or again["id"] == t["id"]

        sleep: Any = {"type": "idem.sleep"}
        await repeat(
            "args-1",
            {**sleep, "args": {"seconds": 1.0, "steps": 1}},
            ({**sleep, "args": {"seconds": 1, "steps": 1}}, 200),
            ({**sleep, "args": {"seconds": 1, "steps": 1.0}}, 200),
            ({**sleep, "args": {"seconds": 1.5, "steps": 1}}, 422),
        )
        await repeat(
            "args-2",
            {**sleep, "args": {}},
            ({**sleep, "args": {"seconds": 5, "steps": 10}}, 200),
            ({**sleep, "args": {"seconds": 5.0}}, 200),
            (sleep, 200),
            ({**sleep, "args": {"seconds": 1}}, 422),
        )
        # A row stored by the previous version: its args hashed as sent.
        v1_body = {**sleep, "args": {"seconds": 1.0}}
        s7, t7, _ = await _post(http, url, tenant, v1_body, {"Idempotency-Key": "v1"})
        assert s7 == 202, t7
        v1 = (
            b"\x01"
            + hashlib.sha256(
                orjson.dumps(
                    TaskRequest.model_validate(v1_body).model_dump(mode="json"),
                    option=orjson.OPT_SORT_KEYS,
                )
            ).digest()
        )
        await db.execute("UPDATE tasks SET request_hash = $1 WHERE id = $2", v1, UUID(t7["id"]))
        s8, t8, _ = await _post(http, url, tenant, v1_body, {"Idempotency-Key": "v1"})
        assert s8 == 200 and t8["id"] == t7["id"], t8
    finally:
        system.stop()


async def test_tenants_see_only_their_own_tasks(
    system: System, http: aiohttp.ClientSession, tenant: Tenant, db: asyncpg.Pool
) -> None:
    """Another tenant gets 404 for a task id, an empty list, and cannot cancel or retry it."""
    await system.start_api()
    other = await create_tenant(db)
    _, task, _ = await _post(
        http, f"{system.api_url}/v1/tasks", tenant, {"type": "demo.noop", "delay_s": 3600}
    )
    for method, path in [
        ("GET", f"/v1/tasks/{task['id']}"),
        ("POST", f"/v1/tasks/{task['id']}/cancel"),
        ("POST", f"/v1/tasks/{task['id']}/retry"),
    ]:
        async with http.request(method, f"{system.api_url}{path}", headers=other.headers) as r:
            body = await r.text()
            assert r.status == 404, (path, r.status)
            assert task["id"] not in body and "demo.noop" not in body
    async with http.get(f"{system.api_url}/v1/tasks", headers=other.headers) as r:
        assert (await r.json())["items"] == []


async def test_list_pages_newest_first_with_filters(
    system: System, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """Cursor pages walk every task once, newest first; state and type filters apply."""
    await system.start_api()
    tenant = await create_tenant(db)
    url = f"{system.api_url}/v1/tasks"
    _, body, _ = await _post(
        http,
        f"{url}:batch",
        tenant,
        {
            "tasks": [{"type": "demo.noop", "delay_s": 3600}] * 7
            + [{"type": "demo.sleep", "delay_s": 3600}] * 3
        },
    )
    created = [t["id"] for t in body["tasks"]]
    # The batch's answer is in the request's order.
    assert [t["type"] for t in body["tasks"]] == ["demo.noop"] * 7 + ["demo.sleep"] * 3
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        async with http.get(url, params=params, headers=tenant.headers) as r:
            page = await r.json()
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(created) and len(seen) == 10
    assert seen == sorted(seen, reverse=True)  # UUIDv7: newest first
    async with http.get(url, params={"type": "demo.sleep"}, headers=tenant.headers) as r:
        assert len((await r.json())["items"]) == 3
    async with http.get(url, params={"state": "running"}, headers=tenant.headers) as r:
        assert (await r.json())["items"] == []
    # With no limit, a page holds the contract's 50.
    await _post(
        http, f"{url}:batch", tenant, {"tasks": [{"type": "demo.noop", "delay_s": 3600}] * 45}
    )
    async with http.get(url, headers=tenant.headers) as r:
        page = await r.json()
    assert len(page["items"]) == 50 and page["next_cursor"] is not None


async def test_cancel_and_retry(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    """A delayed task is cancelled without running; retry runs it; cancelling twice is 409."""
    await system.start_api()
    await system.start_worker()
    url = f"{system.api_url}/v1/tasks"
    _, task, _ = await _post(http, url, tenant, {"type": "demo.noop", "delay_s": 3600})
    status, cancelled, _ = await _post(http, f"{url}/{task['id']}/cancel", tenant, None)
    assert status == 202 and cancelled["state"] == "cancelled" and cancelled["attempts"] == 0
    status, _, _ = await _post(http, f"{url}/{task['id']}/cancel", tenant, None)
    assert status == 409
    status, queued, _ = await _post(http, f"{url}/{task['id']}/retry", tenant, None)
    assert status == 202 and queued["state"] == "queued"

    async def succeeded() -> bool:
        async with http.get(f"{url}/{task['id']}", headers=tenant.headers) as r:
            return (await r.json())["state"] == "succeeded"

    await eventually(succeeded, within=30, what="the retried task to succeed")
    status, _, _ = await _post(http, f"{url}/{task['id']}/retry", tenant, None)
    assert status == 409


@pytest.mark.parametrize("told_by", ["message", "heartbeat"])
async def test_running_task_is_cancelled_within_seconds(
    system: System, http: aiohttp.ClientSession, tenant: Tenant, db: asyncpg.Pool, told_by: str
) -> None:
    """Cancelling a running demo.sleep stops it and ends it cancelled, not succeeded.
    The worker is told through Redis, at most once; a worker that missed the message
    reads cancel_requested_at when it renews its lease (here each half second)."""
    await system.start_api()
    # By message: the default lease, whose heartbeat (each 10 s) comes after the wait.
    await system.start_worker(**({"lease_s": "1.5"} if told_by == "heartbeat" else {}))
    url = f"{system.api_url}/v1/tasks"
    _, task, _ = await _post(
        http, url, tenant, {"type": "demo.sleep", "args": {"seconds": 60, "steps": 60}}
    )

    async def state_is(state: str) -> bool:
        async with http.get(f"{url}/{task['id']}", headers=tenant.headers) as r:
            return (await r.json())["state"] == state

    await eventually(lambda: state_is("running"), within=30, what="the task to start")
    if told_by == "message":
        status, body, _ = await _post(http, f"{url}/{task['id']}/cancel", tenant, None)
        assert status == 202 and body["state"] == "running"
    else:  # what the API's cancel writes, without its message to the workers
        await db.execute("UPDATE tasks SET cancel_requested_at = now() WHERE id = $1", task["id"])
    await eventually(lambda: state_is("cancelled"), within=8, what="the task to be cancelled")


async def test_task_types_say_when_a_worker_last_ran_them(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """`GET /v1/task-types` says when a worker running each type last said so: a type
    whose worker's heartbeat wrote it has a timestamp, one no worker has run has null.
    Its own database: these types reach no other test."""
    db, tenant = isolated.db, isolated.tenant
    await db.execute(
        "INSERT INTO task_types (name, args_schema, seen_at) VALUES"
        " ('seen.recently', '{}', '2026-01-02T03:04:05.678Z'), ('seen.never', '{}', NULL)"
    )
    system = System(isolated.deployment.env())
    try:
        await system.start_api()
        async with http.get(f"{system.api_url}/v1/task-types", headers=tenant.headers) as r:
            assert r.status == 200
            items = {t["name"]: t for t in (await r.json())["items"]}
    finally:
        system.stop()
    assert items["seen.recently"]["last_seen_at"] == "2026-01-02T03:04:05.678Z"
    assert items["seen.never"]["last_seen_at"] is None
    assert set(items["seen.never"]) == {"name", "args_schema", "last_seen_at"}
