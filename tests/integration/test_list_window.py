"""The task list's time window against PostgreSQL: the repository lists exactly the
tasks whose created_at is in the window, page after page, whatever their ids' times
say (a task id's time is the API's clock, created_at PostgreSQL's); and a page of a
window reads about its own rows, not every newer task of the tenant."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest

from services.api.repository import ApiRepository
from shared.db import create_pool
from tests.conftest import Isolated, create_tenant

START = datetime(2026, 12, 7, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def v7(at: datetime, n: int) -> UUID:
    """A UUIDv7 whose time is ``at`` (to the millisecond), ``n`` its random bits."""
    ms = (at - _EPOCH) // timedelta(milliseconds=1)
    return UUID(int=ms << 80 | 0x7 << 76 | 0x2 << 62 | n)


@dataclass(frozen=True)
class Stored:
    id: UUID
    created_at: datetime
    state: str


async def store(pool: asyncpg.Pool, tenant_id: UUID, tasks: list[Stored]) -> None:
    await pool.executemany(
        "INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts, timeout_s,"
        " created_at) VALUES ($1, $2, 'demo.noop', '{}', $3, 3, 60, $4)",
        [(t.id, tenant_id, t.state, t.created_at) for t in tasks],
    )


# How far a task's id time is from its created_at: as good as equal, clocks a little
# apart either way, hours apart either way (clocks far apart, an insert long delayed),
# or no time at all (an id not made by uuid7()). The last three are in the index of
# tasks apart, which a window reads besides its range of ids.
SHIFTS: list[timedelta | None] = [
    timedelta(0),
    timedelta(seconds=59.9),
    timedelta(seconds=-59.9),
    timedelta(hours=3),
    timedelta(hours=-3),
    None,
    timedelta(milliseconds=-3),
]


def history(count: int, salt: int) -> list[Stored]:
    """A task every 20 minutes from START (plus a microsecond each, so that no two are
    created at once), each with the next of SHIFTS, every third one failed."""
    tasks = []
    for k in range(count):
        created = START + timedelta(minutes=20 * k, microseconds=k)
        shift = SHIFTS[k % len(SHIFTS)]
        id_ = uuid.uuid4() if shift is None else v7(created + shift, salt + k)
        tasks.append(Stored(id_, created, "failed" if k % 3 == 0 else "succeeded"))
    return tasks


async def pages(
    repo: ApiRepository,
    tenant_id: UUID,
    *,
    limit: int,
    state: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> list[list[UUID]]:
    """Every page of the listing, each page's ids, as the route reads them: one more
    than the page, the last id of a page the next one's cursor."""
    found: list[list[UUID]] = []
    before = None
    while True:
        rows = await repo.list_tasks(
            tenant_id,
            state=state,
            type_=None,
            before=before,
            limit=limit + 1,
            created_after=created_after,
            created_before=created_before,
        )
        found.append([r["id"] for r in rows[:limit]])
        if len(rows) <= limit:
            return found
        before = rows[limit - 1]["id"]


@pytest.fixture
async def listed(isolated: Isolated) -> tuple[ApiRepository, UUID, list[Stored]]:
    """72 tasks over a day, and another tenant's in the same hours."""
    tasks = history(72, salt=0)
    await store(isolated.db, isolated.tenant.id, tasks)
    other = await create_tenant(isolated.db)
    await store(isolated.db, other.id, history(72, salt=1000))
    return ApiRepository(isolated.db, timeout=10), isolated.tenant.id, tasks


def _at(k: int) -> datetime:
    """The k-th task's created_at (see history)."""
    return START + timedelta(minutes=20 * k, microseconds=k)


@pytest.mark.parametrize(
    ("after", "before"),
    [
        (_at(9), _at(27)),  # six hours, both ends on a task: the first in, the last out
        (_at(9) + timedelta(microseconds=1), _at(27) + timedelta(microseconds=1)),
        (_at(40), None),
        (None, _at(20)),
        (START - timedelta(days=1), START + timedelta(days=2)),  # every task
        (_at(30) + timedelta(minutes=1), _at(31)),  # no task
        (_at(5) - timedelta(hours=5), _at(5) - timedelta(hours=2)),  # before them all
    ],
)
@pytest.mark.parametrize("state", [None, "failed"])
async def test_a_window_lists_exactly_the_tasks_created_in_it(
    listed: tuple[ApiRepository, UUID, list[Stored]],
    after: datetime | None,
    before: datetime | None,
    state: str | None,
) -> None:
    """created_after inclusive, created_before exclusive, on created_at alone: tasks
    whose id time is hours from their created_at, or which have none, are listed by
    their created_at too. Pages of 4 add up to the whole window, newest first by id,
    none twice, and no other tenant's."""
    repo, tenant_id, tasks = listed
    expected = sorted(
        (
            t.id
            for t in tasks
            if (after is None or t.created_at >= after)
            and (before is None or t.created_at < before)
            and state in (None, t.state)
        ),
        reverse=True,
    )
    found = await pages(
        repo, tenant_id, limit=4, state=state, created_after=after, created_before=before
    )
    assert [i for page in found for i in page] == expected
    assert all(len(page) == 4 for page in found[:-1])


async def test_the_window_bounds_are_inclusive_then_exclusive(
    listed: tuple[ApiRepository, UUID, list[Stored]],
) -> None:
    repo, tenant_id, tasks = listed
    # Task 10's id time is 3 hours after its created_at, task 11's 3 hours before.
    window = {"created_after": tasks[10].created_at, "created_before": tasks[12].created_at}
    found = await pages(repo, tenant_id, limit=50, **window)
    assert found == [sorted([tasks[10].id, tasks[11].id], reverse=True)]


@pytest.mark.parametrize("generic_plans", [False, True])
async def test_a_window_page_reads_its_own_rows_not_the_tenants(
    isolated: Isolated, generic_plans: bool
) -> None:
    """14 days of a task a minute; 3 pages of 50 failed tasks of a day in the middle
    read the tasks of their page and of a minute beyond each end of the window, and the
    few tasks indexed apart: not the 10,000 newer tasks a scan from the newest reads."""
    tasks = [
        Stored(
            v7(START + timedelta(minutes=k, seconds=k % 7 - 3), k),
            START + timedelta(minutes=k),
            "failed" if k % 3 == 0 else "succeeded",
        )
        for k in range(14 * 24 * 60)
    ]
    # A few tasks of another kind: in the index of tasks apart.
    tasks += [Stored(uuid.uuid4(), START + timedelta(days=d), "failed") for d in range(14)]
    await store(isolated.db, isolated.tenant.id, tasks)
    await isolated.db.execute("ANALYZE tasks")
    after, before = START + timedelta(days=6), START + timedelta(days=7)
    # Statistics reach pg_stat_* when a backend exits: pools closed before each count.
    await isolated.db.close()
    read_before = await _rows_read(isolated.deployment.database_url)

    pool = await create_pool(
        isolated.deployment.database_url, max_size=1, generic_plans=generic_plans
    )
    repo = ApiRepository(pool, timeout=10)
    found: list[UUID] = []
    try:
        for _ in range(3):
            rows = await repo.list_tasks(
                isolated.tenant.id,
                state="failed",
                type_=None,
                before=found[-1] if found else None,
                limit=51,
                created_after=after,
                created_before=before,
            )
            found += [r["id"] for r in rows[:50]]
    finally:
        await pool.close()
    read = await _rows_read(isolated.deployment.database_url) - read_before

    newest = sorted(
        (t.id for t in tasks if t.state == "failed" and after <= t.created_at < before),
        reverse=True,
    )
    assert found == newest[:150]
    # Per page: about 150 tasks for its 51 failed ones (a third fail), the 14 apart:
    # 160 or so. From the newest task down, the first page alone would read 10,000.
    assert read < 3 * 250, f"3 pages read {read} rows and index entries"


async def _rows_read(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value = await conn.fetchval(
            "SELECT (SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables"
            "        WHERE relname = 'tasks')"
            " + (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes"
            "    WHERE relname = 'tasks')"
        )
    finally:
        await conn.close()
    return int(value)
