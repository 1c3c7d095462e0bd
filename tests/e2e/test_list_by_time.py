"""GET /v1/tasks by time against a running API: ``created_after`` (inclusive) and
``created_before`` (exclusive) with ``state``, page after page by ``next_cursor``, by
HTTP and by the Python client; and the 422 problems of a bad window."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode
from uuid import UUID

import aiohttp
import asyncpg
import pytest

from longhaul import Client
from tests.conftest import Tenant, create_tenant
from tests.support import System

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
START = datetime(2026, 12, 7, 9, tzinfo=UTC)


def _v7(at: datetime) -> UUID:
    """A UUIDv7 of time ``at``, random otherwise (the run's tests share a database)."""
    ms = (at - _EPOCH) // timedelta(milliseconds=1)
    return UUID(int=ms << 80 | 0x7 << 76 | 0x2 << 62 | uuid.uuid4().int & ((1 << 62) - 1))


# A task every 10 minutes for 5 hours. Most ids' time is their created_at give or take
# a few milliseconds; every fifth id's is two hours off, every seventh is no UUIDv7: the
# list goes by created_at, whatever the id says.
CREATED = [START + timedelta(minutes=10 * k, microseconds=k) for k in range(30)]
STATES = ["failed", "succeeded", "queued"]


@pytest.fixture
async def history(db: asyncpg.Pool) -> tuple[Tenant, list[tuple[UUID, datetime, str]]]:
    tenant = await create_tenant(db)
    tasks = []
    for k, created in enumerate(CREATED):
        if k % 7 == 3:
            id_ = uuid.uuid4()
        else:
            off = timedelta(hours=2 if k % 2 else -2) if k % 5 == 4 else timedelta(milliseconds=k)
            id_ = _v7(created + off)
        tasks.append((id_, created, STATES[k % 3]))
    # Stored as the API stores them, then given the created_at of the story: no outbox
    # row, so nothing is published, and no finished_at, so retention leaves them.
    await db.executemany(
        "INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts, timeout_s,"
        " created_at) VALUES ($1, $2, 'demo.noop', '{}', $3, 3, 60, $4)",
        [(i, tenant.id, s, c) for i, c, s in tasks],
    )
    return tenant, tasks


def _expected(
    tasks: list[tuple[UUID, datetime, str]], after: datetime, before: datetime, state: str | None
) -> list[str]:
    return [
        str(i)
        for i, c, s in sorted(tasks, reverse=True)
        if after <= c < before and state in (None, s)
    ]


async def test_a_window_with_a_state_is_paged_by_its_cursor(
    system: System, history: tuple[Tenant, list[tuple[UUID, datetime, str]]]
) -> None:
    """Each next page is asked with the same window and state and the cursor: pages of
    two add up to the window's tasks of that state, newest first, once each."""
    tenant, tasks = history
    await system.start_api()
    # From task 4 (inclusive, its id two hours early) to task 25 (exclusive), one end
    # written with an offset.
    params = {
        "created_after": "2026-12-07T10:40:00.000004+01:00",
        "created_before": CREATED[25].isoformat().replace("+00:00", "Z"),
        "state": "failed",
        "limit": "2",
    }
    expected = _expected(tasks, CREATED[4], CREATED[25], "failed")
    assert len(expected) == 7
    found: list[str] = []
    pages = 0
    async with aiohttp.ClientSession(headers=tenant.headers) as http:
        query = dict(params)
        while True:
            async with http.get(f"{system.api_url}/v1/tasks?{urlencode(query)}") as r:
                assert r.status == 200, await r.text()
                page = await r.json()
            pages += 1
            assert len(page["items"]) <= 2
            found += [t["id"] for t in page["items"]]
            if page["next_cursor"] is None:
                break
            query = {**params, "cursor": page["next_cursor"]}
    assert found == expected
    assert pages == 4
    # Without the state: every task of the window, in one page.
    async with aiohttp.ClientSession(headers=tenant.headers) as http:
        query = {**params, "limit": "500"}
        del query["state"]
        async with http.get(f"{system.api_url}/v1/tasks?{urlencode(query)}") as r:
            page = await r.json()
    assert [t["id"] for t in page["items"]] == _expected(tasks, CREATED[4], CREATED[25], None)
    assert page["next_cursor"] is None


async def test_the_python_client_lists_a_window(
    system: System, history: tuple[Tenant, list[tuple[UUID, datetime, str]]]
) -> None:
    tenant, tasks = history
    await system.start_api()
    after, before = CREATED[10], CREATED[20] + timedelta(microseconds=1)
    async with Client(system.api_url, tenant.key) as client:
        found = [
            str(t.id)
            async for t in client.tasks(created_after=after, created_before=before, page=3)
        ]
        queued = [
            str(t.id) async for t in client.tasks(state="queued", created_after=after, page=3)
        ]
    assert found == _expected(tasks, after, before, None) and len(found) == 11
    assert queued == _expected(tasks, after, datetime.max.replace(tzinfo=UTC), "queued")


async def test_a_bad_window_is_a_422_problem(system: System, tenant: Tenant) -> None:
    """In the shape of the list's other parameter errors: a validation problem whose
    errors name the parameter."""
    await system.start_api()
    cases = {
        "created_after=2026-12-07T10:00:00": ("created_after", "has no timezone"),
        "created_before=next+week": ("created_before", "not an RFC 3339 timestamp"),
        "created_after=2026-12-07T10:00:00Z&created_before=2026-12-07T10:00:00Z": (
            "created_before",
            "must be later than created_after",
        ),
        "created_after=2026-12-07T10:00:00Z&created_after=2026-12-08T10:00:00Z": (
            "created_after",
            "given more than once",
        ),
    }
    async with aiohttp.ClientSession(headers=tenant.headers) as http:
        for query, (name, says) in cases.items():
            async with http.get(f"{system.api_url}/v1/tasks?{query}") as r:
                assert (r.status, r.content_type) == (422, "application/problem+json"), query
                body = await r.json()
            assert body["type"].endswith("/validation"), body
            assert [e["loc"] for e in body["errors"]] == [["query", name]], body
            assert body["errors"][0]["msg"].startswith(says), body
            assert body["detail"].startswith(f"query.{name}: {says}"), body
