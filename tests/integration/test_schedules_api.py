"""The /v1/schedules routes of a real API process on a real PostgreSQL: created (201)
after the checks a submission of its tasks gets, listed, read, changed and deleted;
another tenant's schedules are 404 through every route; errors are problems."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from shared import cron
from shared.ids import uuid7
from tests.conftest import Isolated, Tenant, create_tenant
from tests.support import System, register_task_types

PROBLEM = "application/problem+json"


@pytest.fixture
async def api(isolated: Isolated) -> AsyncIterator[System]:
    """An API on a database of the test's own, the built-in types registered (a worker
    registers them at start, then stops: none runs, so no schedule fires here)."""
    env = isolated.deployment.env()
    await register_task_types(env)
    system = System(env)
    try:
        await system.start_api(rate_limit_per_s="0")
        yield system
    finally:
        system.stop()


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    tenant: Tenant,
    body: Any = None,
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.request(method, url, json=body, headers=tenant.headers) as r:
        if r.status == 204:
            assert await r.read() == b""
            return r.status, None, r.headers
        doc = await r.json(content_type=None)
        if r.status >= 400:
            assert r.content_type == PROBLEM, r.content_type
            assert doc["status"] == r.status and doc["detail"], doc
        return r.status, doc, r.headers


def _ts(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_a_schedule_is_created_read_listed_changed_and_deleted(
    api: System, isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    url = f"{api.api_url}/v1/schedules"
    me = isolated.tenant
    body = {
        "name": "daily sleep",
        "cron": "0 6 * * *",
        "type": "demo.sleep",
        "args": {"seconds": 1, "steps": 2},
        "priority": 5,
    }
    status, created, headers = await _call(http, "POST", url, me, body)
    assert status == 201, created
    assert headers["Location"] == f"/v1/schedules/{created['id']}"
    assert {k: created[k] for k in body} == body
    assert (created["max_attempts"], created["timeout_s"], created["enabled"]) == (
        None,
        None,
        True,
    )
    assert (created["last_run_at"], created["last_task_id"], created["last_error"]) == (
        None,
        None,
        None,
    )
    # Its first fire time after its creation, by the database's clock.
    created_at = _ts(created["created_at"])
    assert created_at is not None
    assert _ts(created["next_run_at"]) == cron.next_after("0 6 * * *", created_at)

    status, again, _ = await _call(http, "POST", url, me, {**body, "cron": "@hourly"})
    assert status == 409 and again["type"].endswith("/schedule-exists"), again

    one = f"{url}/{created['id']}"
    status, read, _ = await _call(http, "GET", one, me)
    assert (status, read) == (200, created)

    second = {"name": "hourly", "cron": "@hourly", "type": "demo.noop", "enabled": False}
    status, off, _ = await _call(http, "POST", url, me, second)
    assert status == 201 and off["enabled"] is False and off["next_run_at"] is None
    status, page, _ = await _call(http, "GET", f"{url}?limit=1", me)
    assert status == 200 and [s["id"] for s in page["items"]] == [off["id"]]
    status, rest, _ = await _call(http, "GET", f"{url}?limit=1&cursor={page['next_cursor']}", me)
    assert [s["id"] for s in rest["items"]] == [created["id"]] and rest["next_cursor"] is None

    # Disabled: no next fire. Enabled again: the first fire time after now.
    status, changed, _ = await _call(http, "PATCH", one, me, {"enabled": False})
    assert status == 200 and changed["enabled"] is False and changed["next_run_at"] is None
    status, changed, _ = await _call(http, "PATCH", one, me, {"enabled": True})
    updated_at = _ts(changed["updated_at"])
    assert updated_at is not None and updated_at > created_at
    assert _ts(changed["next_run_at"]) == cron.next_after("0 6 * * *", updated_at)
    # A new expression: its first fire time after now; the rest as it was.
    status, changed, _ = await _call(http, "PATCH", one, me, {"cron": "*/10 * * * *"})
    assert status == 200 and changed["cron"] == "*/10 * * * *"
    updated_at = _ts(changed["updated_at"])
    assert updated_at is not None
    assert _ts(changed["next_run_at"]) == cron.next_after("*/10 * * * *", updated_at)
    assert {k: changed[k] for k in ("name", "type", "args", "priority")} == {
        k: body[k] for k in ("name", "type", "args", "priority")
    }
    # New args: the next fire time stays.
    status, changed2, _ = await _call(http, "PATCH", one, me, {"args": {"seconds": 2}})
    assert status == 200 and changed2["args"] == {"seconds": 2}
    assert changed2["next_run_at"] == changed["next_run_at"]
    status, same, _ = await _call(http, "PATCH", one, me, {})
    assert status == 200 and same["next_run_at"] == changed["next_run_at"]

    status, _, _ = await _call(http, "DELETE", one, me)
    assert status == 204
    for method in ("GET", "DELETE"):
        status, gone, _ = await _call(http, method, one, me)
        assert status == 404 and gone["detail"] == "no such schedule"
    status, gone, _ = await _call(http, "PATCH", one, me, {"enabled": False})
    assert status == 404


# Bodies a creation refuses, with where its errors are. Checked as a submission of its
# tasks would be: the type must be registered and the args valid against its schema.
REFUSED: list[tuple[dict[str, Any], list[list[str]]]] = [
    ({"type": "no.such.type"}, [["body", "type"]]),
    ({"type": "demo.sleep", "args": {"seconds": "soon"}}, [["body", "args", "seconds"]]),
    ({"type": "demo.sleep", "args": {"seconds": -1}}, [["body", "args", "seconds"]]),
    ({"type": "demo.noop", "args": {"x": 1}}, [["body", "args"]]),
    ({"cron": "61 * * * *"}, [["body", "cron"]]),
    ({"cron": "0 0 30 2 *"}, [["body", "cron"]]),
    # Both at once: every error named.
    ({"cron": "* * *", "type": "no.such.type"}, [["body", "cron"], ["body", "type"]]),
    ({"delay_s": 5}, [["body", "delay_s"]]),
    ({"priority": 10}, [["body", "priority"]]),
    ({"name": ""}, [["body", "name"]]),
    ({"enabled": "no"}, [["body", "enabled"]]),
]


async def test_a_schedule_its_tasks_could_not_be_is_refused(
    api: System, isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    for body, locs in REFUSED:
        full = {"name": f"n-{uuid7().hex}", "cron": "@daily", "type": "demo.noop", **body}
        status, problem, _ = await _call(
            http, "POST", f"{api.api_url}/v1/schedules", isolated.tenant, full
        )
        assert status == 422, (body, problem)
        assert [e["loc"] for e in problem["errors"]] == locs, (body, problem)
        if body.get("cron") == "0 0 30 2 *":
            assert "never fires" in problem["detail"]
    status, page, _ = await _call(http, "GET", f"{api.api_url}/v1/schedules", isolated.tenant)
    assert page["items"] == []


async def test_a_change_is_checked_as_a_creation_is(
    api: System, isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """New args against the schedule's type as registered now; a new cron parsed; the
    schedule left as it was when refused."""
    me = isolated.tenant
    body = {"name": "s", "cron": "@daily", "type": "demo.sleep", "args": {"seconds": 1}}
    status, created, _ = await _call(http, "POST", f"{api.api_url}/v1/schedules", me, body)
    assert status == 201
    one = f"{api.api_url}/v1/schedules/{created['id']}"
    for change, locs in (
        ({"args": {"seconds": "x"}}, [["body", "args", "seconds"]]),
        ({"cron": "* * * * * *"}, [["body", "cron"]]),
        (
            {"cron": "5/15 * * * *", "args": {"seconds": -1}},
            [["body", "cron"], ["body", "args", "seconds"]],
        ),
        ({"name": "renamed"}, [["body", "name"]]),
        ({"type": "demo.noop"}, [["body", "type"]]),
        ({"enabled": 0}, [["body", "enabled"]]),
    ):
        status, problem, _ = await _call(http, "PATCH", one, me, change)
        assert status == 422, (change, problem)
        assert [e["loc"] for e in problem["errors"]] == locs, (change, problem)
    status, now, _ = await _call(http, "GET", one, me)
    assert now == created
    async with http.patch(
        one, data=b"{", headers={**me.headers, "Content-Type": "application/json"}
    ) as r:
        assert r.status == 400 and r.content_type == PROBLEM
    async with http.patch(one, data=b"{}", headers=me.headers) as r:
        assert r.status == 415


async def test_another_tenants_schedules_are_not_found_through_any_route(
    api: System, isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """404 for B on A's schedule (never 403), whatever the route; B's list is empty;
    B may use a name A uses; A's schedule is untouched."""
    a = isolated.tenant
    b = await create_tenant(isolated.db)
    url = f"{api.api_url}/v1/schedules"
    body = {"name": "shared name", "cron": "@daily", "type": "demo.noop", "args": {}}
    status, mine, _ = await _call(http, "POST", url, a, body)
    assert status == 201
    one = f"{url}/{mine['id']}"
    for method, change in (
        ("GET", None),
        ("PATCH", {"enabled": False}),
        ("PATCH", {"args": {}}),
        ("DELETE", None),
    ):
        status, problem, _ = await _call(http, method, one, b, change)
        assert status == 404, (method, change, problem)
        assert mine["id"] not in str(problem)
    status, page, _ = await _call(http, "GET", url, b)
    assert page == {"items": [], "next_cursor": None}
    status, theirs, _ = await _call(http, "POST", url, b, body)
    assert status == 201 and theirs["id"] != mine["id"]
    status, still, _ = await _call(http, "GET", one, a)
    assert (status, still) == (200, mine)
    for bad in ("not-a-uuid", str(uuid7())):
        status, _, _ = await _call(http, "GET", f"{url}/{bad}", a)
        assert status == 404
    async with http.get(url) as r:
        assert r.status == 401 and r.content_type == PROBLEM


async def test_a_tenant_has_at_most_the_schedules_the_deployment_allows(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """Their fires pass no rate limit: past LONGHAUL_MAX_SCHEDULES_PER_TENANT a creation
    is a 409 problem, for that tenant alone, until one of its schedules is deleted."""
    env = isolated.deployment.env()
    await register_task_types(env)
    system = System(env)
    try:
        await system.start_api(rate_limit_per_s="0", max_schedules_per_tenant="2")
        url = f"{system.api_url}/v1/schedules"
        a, b = isolated.tenant, await create_tenant(isolated.db)

        def body(name: str) -> dict[str, Any]:
            return {"name": name, "cron": "@daily", "type": "demo.noop", "args": {}}

        made = []
        for name in ("one", "two"):
            status, doc, _ = await _call(http, "POST", url, a, body(name))
            assert status == 201, doc
            made.append(doc["id"])
        status, problem, _ = await _call(http, "POST", url, a, body("three"))
        assert status == 409 and problem["type"].endswith("schedule-limit"), problem
        assert "LONGHAUL_MAX_SCHEDULES_PER_TENANT" in problem["detail"]
        status, _, _ = await _call(http, "POST", url, b, body("three"))
        assert status == 201  # another tenant's count is its own
        status, _, _ = await _call(http, "DELETE", f"{url}/{made[0]}", a)
        assert status == 204
        status, doc, _ = await _call(http, "POST", url, a, body("three"))
        assert status == 201, doc
    finally:
        system.stop()
