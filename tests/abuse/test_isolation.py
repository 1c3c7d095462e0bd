"""Tenant isolation (DESIGN promise 6), walked from the OpenAPI document: another
tenant reaches none of A's tasks, dead letters, schedules, args or results through any
REST route, the WebSocket or the SSE stream."""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import asyncpg
import orjson
from websockets.asyncio.client import connect

from shared.ids import uuid7
from tests.abuse.conftest import TASKS_MODULE, MakeSystem, request
from tests.conftest import Deployment, Tenant, create_tenant
from tests.support import System, eventually, timeout

# Bodies for the operations that take one; anything else is sent without a body.
BODIES: dict[str, Any] = {
    "submitTask": {"type": "demo.noop", "delay_s": 3600},
    "submitTasks": {"tasks": [{"type": "demo.noop", "delay_s": 3600}]},
    # Disabled: in the run's shared database, no other test's worker fires it.
    "createSchedule": {"name": "b's", "cron": "@daily", "type": "demo.noop", "enabled": False},
    "updateSchedule": {"enabled": True, "args": {}},
}
# Operations that create something of the caller's own: walked last, so that every
# list read before them must be empty.
CREATING = {"submitTask", "submitTasks", "createWsToken", "createSchedule"}


async def _a_tasks(
    http: aiohttp.ClientSession, system: System, a: Tenant, marker: str
) -> dict[str, dict[str, Any]]:
    """A queued, a succeeded and a failed task of tenant A, all carrying the marker."""
    url = f"{system.api_url}/v1/tasks"
    bodies = {
        "queued": {"type": "abuse.echo", "args": {"marker": marker}, "delay_s": 3600},
        "succeeded": {"type": "abuse.echo", "args": {"marker": marker}},
        "failed": {"type": "abuse.echo", "args": {"marker": marker, "fail": True}},
    }
    ids = {}
    for state, body in bodies.items():
        status, raw, _ = await request(http, "POST", url, json=body, headers=a.headers)
        assert status == 202, raw
        ids[state] = orjson.loads(raw)["id"]

    async def settled() -> dict[str, dict[str, Any]] | None:
        tasks = {}
        for state, task_id in ids.items():
            _, raw, _ = await request(http, "GET", f"{url}/{task_id}", headers=a.headers)
            tasks[state] = orjson.loads(raw)
            if tasks[state]["state"] != state:
                return None
        return tasks

    return await eventually(settled, within=30, what="A's tasks to settle")


def _cursor(before: UUID) -> str:
    return base64.urlsafe_b64encode(before.bytes).decode().rstrip("=")


async def test_another_tenant_reaches_nothing_of_a_through_any_route(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """Every operation of /openapi.json, with A's ids, A's dead-letter and schedule ids
    and random ids, answers B with 404 or an empty list and never shows A's ids, args or
    results."""
    system = systems(deployment)
    await system.start_api(rate_limit_per_s="0")
    await system.start_worker("--tasks", TASKS_MODULE)
    await system.start_gateway()
    a, b = await create_tenant(db), await create_tenant(db)
    marker = f"secret-marker-{uuid4().hex}"
    tasks = await _a_tasks(http, system, a, marker)
    assert tasks["succeeded"]["result"] == {"echo": marker[::-1]}
    assert marker in tasks["failed"]["error"]["message"]
    dead_letter = uuid7()
    await db.execute(
        "INSERT INTO dead_letters (id, tenant_id, task_id, reason, detail, body) "
        "VALUES ($1, $2, $3, 'poison', $4, $5)",
        dead_letter,
        a.id,
        UUID(tasks["failed"]["id"]),
        f"detail {marker}",
        orjson.dumps({"marker": marker}),
    )
    status, raw, _ = await request(
        http,
        "POST",
        f"{system.api_url}/v1/schedules",
        json={
            "name": f"a's {marker}",
            "cron": "@daily",
            "type": "abuse.echo",
            "args": {"marker": marker},
            "enabled": False,
        },
        headers=a.headers,
    )
    assert status == 201, raw
    schedule = orjson.loads(raw)
    try:
        await _walk(http, system, a, b, marker, tasks, dead_letter, schedule)
    finally:
        await db.execute("DELETE FROM schedules WHERE tenant_id = ANY($1::uuid[])", [a.id, b.id])


async def _walk(
    http: aiohttp.ClientSession,
    system: System,
    a: Tenant,
    b: Tenant,
    marker: str,
    tasks: dict[str, dict[str, Any]],
    dead_letter: UUID,
    schedule: dict[str, Any],
) -> None:
    """B walks every operation over A's tasks, dead letter and schedule."""
    a_ids = [t["id"] for t in tasks.values()]
    forbidden = [
        *a_ids,
        str(dead_letter),
        schedule["id"],
        marker,
        marker[::-1],
        str(a.id),
        a.name,
    ]
    # A itself sees them: the walk below would prove nothing otherwise.
    _, raw, _ = await request(http, "GET", f"{system.api_url}/v1/dead-letters", headers=a.headers)
    assert str(dead_letter) in raw.decode() and marker in raw.decode()

    def clean(where: str, raw: bytes | str) -> None:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        leaked = [f for f in forbidden if f in text]
        assert not leaked, (where, leaked, text[:300])

    status, raw, _ = await request(http, "GET", f"{system.api_url}/openapi.json")
    assert status == 200
    doc = orjson.loads(raw)
    operations = [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    operations.sort(key=lambda o: o[2]["operationId"] in CREATING)
    ids_to_try = [*a_ids, str(dead_letter), schedule["id"], str(uuid4()), str(uuid7())]
    queries = [
        {},
        {"type": "abuse.echo"},
        {"state": "succeeded"},
        {"state": "queued"},
        {"cursor": _cursor(UUID(int=2**128 - 1))},
        {"created_after": "2000-01-01T00:00:00Z", "created_before": "2100-01-01T00:00:00Z"},
    ]
    walked = set()
    for path, method, op in operations:
        name = op["operationId"]
        walked.add(name)
        params = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        urls = [path.replace("{id}", i) for i in ids_to_try] if "{id}" in path else [path]
        for url in urls:
            for query in [q for q in queries if set(q) <= params] or [{}]:
                status, raw, headers = await request(
                    http,
                    method.upper(),
                    f"{system.api_url}{url}",
                    params=query,
                    json=BODIES.get(name),
                    headers=b.headers,
                )
                where = f"{method.upper()} {url} {query}"
                clean(where, raw)
                clean(where, str(dict(headers)))
                assert status < 500, (where, status)
                if "{id}" in path:
                    assert status == 404, (where, status, raw[:200])
                    assert orjson.loads(raw)["status"] == 404
                elif name not in CREATING:
                    assert status == 200, (where, status)
                    assert orjson.loads(raw)["items"] == [] or name == "listTaskTypes", where
    assert len(walked) >= 14 and {"getTask", "cancelTask", "redriveDeadLetter"} <= walked
    assert {"getSchedule", "updateSchedule", "deleteSchedule", "listSchedules"} <= walked
    print(f"walked {len(walked)} operations as tenant B: {sorted(walked)}")

    # A's tasks are as they were: B's cancel and retry touched nothing; nor did B's
    # changes and deletion touch A's schedule.
    for state, task in tasks.items():
        _, raw, _ = await request(
            http, "GET", f"{system.api_url}/v1/tasks/{task['id']}", headers=a.headers
        )
        assert orjson.loads(raw)["state"] == state
    _, raw, _ = await request(
        http, "GET", f"{system.api_url}/v1/schedules/{schedule['id']}", headers=a.headers
    )
    assert orjson.loads(raw) == schedule

    # The gateway: B's subscriptions to A's tasks get not_found, its SSE requests 404.
    async def b_token() -> str:
        _, raw, _ = await request(http, "POST", f"{system.api_url}/v1/ws-tokens", headers=b.headers)
        return str(orjson.loads(raw)["token"])

    async with connect(f"ws://127.0.0.1:{system.gateway_port}/v1/ws?token={await b_token()}") as ws:
        for task_id in ids_to_try:
            await ws.send(orjson.dumps({"op": "subscribe", "task_id": task_id}).decode())
            async with asyncio.timeout(timeout(10)):
                frame = await ws.recv()
            got = orjson.loads(frame)
            assert got["type"] == "error" and got["code"] == "not_found", got
            assert got["task_id"] == task_id
            clean(f"ws {task_id}", str(frame).replace(task_id, ""))
    for task_id in ids_to_try:
        status, raw, headers = await request(
            http,
            "GET",
            f"http://127.0.0.1:{system.gateway_port}/v1/tasks/{task_id}/events",
            headers={"Authorization": f"Bearer {await b_token()}", "Last-Event-ID": "0"},
        )
        assert status == 404, (task_id, status)
        clean(f"sse {task_id}", raw)
        clean(f"sse {task_id} headers", str(dict(headers)))
