"""Firing schedules against a real PostgreSQL (WorkerRepository.fire_schedules with the
worker's own plan): a due schedule's task and outbox row stored as a submission's, its
next fire time after now (missed fires coalesced), a fire never stored twice, workers
firing at once sharing the due schedules, and a bad schedule passed over without
stopping the others."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from services.worker.repository import WorkerRepository
from services.worker.schedules import Fire, Skipped, fire_key, plan
from shared import cron
from shared.db import NOTIFY_CHANNEL, create_pool
from shared.ids import uuid7
from tests.conftest import Isolated
from tests.support import timeout

DAILY = "0 6 * * *"
ECHO_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}},
    "additionalProperties": False,
}


@pytest.fixture
async def repo(isolated: Isolated) -> WorkerRepository:
    """The worker's repository on a database of the test's own (no other test's
    schedules come due in it), with the type the schedules make registered."""
    await isolated.db.execute(
        "INSERT INTO task_types (name, args_schema, max_attempts, seen_at)"
        " VALUES ('sched.echo', $1, 2, now())",
        ECHO_SCHEMA,
    )
    return WorkerRepository(isolated.db, timeout=10)


async def _schedule(isolated: Isolated, **fields: Any) -> UUID:
    """A schedule stored directly, due three days ago (three daily fires missed)."""
    values = {
        "id": uuid7(),
        "tenant_id": isolated.tenant.id,
        "name": f"s-{uuid7().hex[-10:]}",
        "cron": DAILY,
        "type": "sched.echo",
        "args": {"n": 1},
        "enabled": True,
        **fields,
    }
    due = values.pop("due", timedelta(days=3))
    columns = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    await isolated.db.execute(
        f"INSERT INTO schedules ({columns}, next_run_at)"
        f" VALUES ({params}, now() - ${len(values) + 1}::interval)",
        *values.values(),
        due,
    )
    return UUID(str(values["id"]))


async def _row(isolated: Isolated, schedule_id: UUID) -> asyncpg.Record:
    row = await isolated.db.fetchrow("SELECT * FROM schedules WHERE id = $1", schedule_id)
    assert row is not None
    return row


async def _tasks_of(isolated: Isolated, schedule_id: UUID) -> list[asyncpg.Record]:
    return list(
        await isolated.db.fetch(
            "SELECT t.*, o.id AS outbox_id, o.claimed_until, o.attempt AS outbox_attempt"
            " FROM tasks t LEFT JOIN outbox o ON o.task_id = t.id"
            " WHERE t.idempotency_key LIKE $1 ORDER BY t.id",
            f"schedule\n{schedule_id}\n%",
        )
    )


async def test_a_due_schedule_makes_one_task_stored_as_a_submissions(
    isolated: Isolated, repo: WorkerRepository
) -> None:
    """One task for the three missed fires, queued with its outbox row (unclaimed: any
    relay's poll publishes it), under the fire's key, with its type's defaults; the
    schedule then fires next at its first fire time after the fire, by the database's
    clock, and is not due again."""
    schedule_id = await _schedule(isolated, priority=6, timeout_s=30.0)
    due_at = (await _row(isolated, schedule_id))["next_run_at"]
    [fire] = await repo.fire_schedules(plan, 100)
    assert fire.task is not None and fire.schedule_id == schedule_id and fire.due_at == due_at
    [task] = await _tasks_of(isolated, schedule_id)
    assert task["id"] == fire.task.id and task["tenant_id"] == isolated.tenant.id
    assert (task["type"], task["args"], task["state"], task["last_seq"]) == (
        "sched.echo",
        {"n": 1},
        "queued",
        1,
    )
    # The schedule's own priority and timeout; the type's own max_attempts.
    assert (task["priority"], task["timeout_s"], task["max_attempts"]) == (6, 30.0, 2)
    assert task["idempotency_key"] == fire_key(schedule_id, due_at)
    assert task["trace_id"] and len(task["trace_id"]) == 32
    assert task["outbox_id"] is not None and task["outbox_attempt"] == 1
    assert task["claimed_until"] is None
    after = await _row(isolated, schedule_id)
    assert after["next_run_at"] == cron.next_after(DAILY, task["created_at"])
    assert after["next_run_at"] > task["created_at"]
    assert (after["last_run_at"], after["last_task_id"], after["last_error"]) == (
        due_at,
        task["id"],
        None,
    )
    assert await repo.fire_schedules(plan, 100) == []  # not due any more


async def test_a_fire_already_stored_is_not_stored_again(
    isolated: Isolated, repo: WorkerRepository
) -> None:
    """Should a schedule come due again at a fire time it already made a task for (its
    next_run_at put back), the fire's key finds that task: nothing new is stored, and
    the schedule moves on."""
    schedule_id = await _schedule(isolated)
    due_at = (await _row(isolated, schedule_id))["next_run_at"]
    [first] = await repo.fire_schedules(plan, 100)
    assert first.task is not None
    other = await _schedule(isolated)  # fired beside it, in the same statement at first
    await isolated.db.execute(
        "UPDATE schedules SET next_run_at = $2 WHERE id = $1", schedule_id, due_at
    )
    fires = {f.schedule_id: f for f in await repo.fire_schedules(plan, 100)}
    again = fires[schedule_id]
    assert again.repeated and again.task is None and again.skipped is None
    assert fires[other].task is not None and not fires[other].repeated
    assert [t["id"] for t in await _tasks_of(isolated, schedule_id)] == [first.task.id]
    assert len(await _tasks_of(isolated, other)) == 1
    after = await _row(isolated, schedule_id)
    assert after["next_run_at"] > due_at and after["last_task_id"] == first.task.id


async def test_a_schedule_another_worker_holds_is_left_to_it(
    isolated: Isolated, repo: WorkerRepository
) -> None:
    """SKIP LOCKED: while another transaction holds some due schedules (a worker firing
    them), a fire takes only the others; once released, they are fired, each once."""
    held = [await _schedule(isolated) for _ in range(3)]
    free = [await _schedule(isolated) for _ in range(2)]
    async with isolated.db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM schedules WHERE id = ANY($1) FOR UPDATE", held)
        fired = await repo.fire_schedules(plan, 100)
        assert sorted(f.schedule_id for f in fired) == sorted(free)
    fired = await repo.fire_schedules(plan, 100)
    assert sorted(f.schedule_id for f in fired) == sorted(held)
    for schedule_id in held + free:
        assert len(await _tasks_of(isolated, schedule_id)) == 1


async def test_workers_firing_at_once_fire_each_schedule_once(
    isolated: Isolated, repo: WorkerRepository
) -> None:
    """Four firings at once, in batches of three, over twenty due schedules: every one
    fired, by one of them, into one task."""
    ids = [await _schedule(isolated) for _ in range(20)]
    repos = [WorkerRepository(isolated.db, timeout=10) for _ in range(4)]

    async def fire_all(r: WorkerRepository) -> list[Fire]:
        done: list[Fire] = []
        while batch := await r.fire_schedules(plan, 3):
            done += batch
        return done

    results = await asyncio.wait_for(asyncio.gather(*(fire_all(r) for r in repos)), timeout(60))
    fired = [f.schedule_id for batch in results for f in batch]
    assert sorted(fired) == sorted(ids)
    assert all(f.task is not None for batch in results for f in batch)
    count = await isolated.db.fetchval(
        "SELECT count(*) FROM tasks WHERE tenant_id = $1", isolated.tenant.id
    )
    assert count == 20


async def test_a_bad_schedule_is_passed_over_and_the_others_fire(
    isolated: Isolated, repo: WorkerRepository
) -> None:
    """A type no longer registered, or args the type's schema now refuses: no task, the
    reason in last_error, the next fire time after now (not looked at again at every
    poll). A disabled schedule, due or not, is not touched."""
    good = await _schedule(isolated, due=timedelta(days=2))
    gone = await _schedule(isolated, type="gone.type", due=timedelta(days=3))
    refused = await _schedule(isolated, args={"n": "three"}, due=timedelta(days=4))
    disabled = await _schedule(isolated, enabled=False, due=timedelta(days=5))
    before = await _row(isolated, disabled)
    fires = {f.schedule_id: f for f in await repo.fire_schedules(plan, 100)}
    assert set(fires) == {good, gone, refused}
    assert fires[good].task is not None
    assert fires[gone].skipped is Skipped.UNKNOWN_TYPE
    assert fires[refused].skipped is Skipped.INVALID_ARGS
    for schedule_id, says in (
        (gone, "type: unknown task type 'gone.type'"),
        (refused, "args.n: 'three' is not of type 'integer'"),
    ):
        row = await _row(isolated, schedule_id)
        assert row["last_error"] is not None and row["last_error"].endswith(says), row
        assert row["last_task_id"] is None and row["last_run_at"] is None
        assert row["next_run_at"] is not None and row["next_run_at"] > row["created_at"]
        assert await _tasks_of(isolated, schedule_id) == []
    assert dict(await _row(isolated, disabled)) == dict(before)
    assert len(await _tasks_of(isolated, good)) == 1


async def test_a_task_the_database_refuses_fails_only_its_own_fire(
    isolated: Isolated, repo: WorkerRepository
) -> None:
    """A fire whose task the database will not store (here a CHECK of this test's own
    database) is passed over with the database's reason; the fires of its batch are
    stored one by one, and the others make their tasks."""
    await isolated.db.execute(
        "ALTER TABLE tasks ADD CONSTRAINT test_refuses CHECK (args->>'n' IS DISTINCT FROM '13')"
    )
    before = await _schedule(isolated, due=timedelta(days=3))
    bad = await _schedule(isolated, args={"n": 13}, due=timedelta(days=2))
    after = await _schedule(isolated, due=timedelta(days=1))
    fires = {f.schedule_id: f for f in await repo.fire_schedules(plan, 100)}
    assert fires[bad].task is None and fires[bad].skipped is Skipped.INVALID_TASK
    assert fires[bad].error is not None and "test_refuses" in fires[bad].error
    assert (await _row(isolated, bad))["last_error"] == fires[bad].error
    assert await _tasks_of(isolated, bad) == []
    for schedule_id in (before, after):
        assert fires[schedule_id].task is not None
        assert len(await _tasks_of(isolated, schedule_id)) == 1


async def test_a_fire_wakes_the_relays(isolated: Isolated, repo: WorkerRepository) -> None:
    """Its outbox rows are published by any relay: a NOTIFY on the outbox channel, at
    commit, wakes them all at once rather than at their next poll."""
    woken = asyncio.Event()
    listener = await asyncpg.connect(isolated.deployment.database_url)
    try:
        await listener.add_listener(NOTIFY_CHANNEL, lambda *_: woken.set())
        await _schedule(isolated)
        [fire] = await repo.fire_schedules(plan, 100)
        assert fire.task is not None
        await asyncio.wait_for(woken.wait(), timeout(10))
    finally:
        await listener.close()


async def test_looking_for_due_schedules_reads_only_the_due_ones(isolated: Isolated) -> None:
    """Among 5,000 schedules not due and 2,000 disabled ones whose time has passed, a
    look for due schedules reads the few that are due (the index schedules_due), not
    the table: every worker looks every few seconds."""
    await isolated.db.execute(
        """
        INSERT INTO schedules (id, tenant_id, name, cron, type, enabled, next_run_at)
        SELECT gen_random_uuid(), $1, 'n' || i, '0 6 * * *', 'sched.echo', i > 2000,
               now() + CASE WHEN i > 2000 THEN interval '1 day' ELSE interval '-1 day' END
        FROM generate_series(1, 7000) AS i
        """,
        isolated.tenant.id,
    )
    await isolated.db.execute("ANALYZE schedules")
    due = [await _schedule(isolated) for _ in range(3)]
    pool = await create_pool(isolated.deployment.database_url, max_size=1, generic_plans=True)
    try:
        repo = WorkerRepository(pool, timeout=10)
        for _ in range(6):  # past the five runs after which a generic plan may be used
            fired = await repo.fire_schedules(plan, 100)
            assert {f.schedule_id for f in fired} <= set(due)
    finally:
        await pool.close()  # a backend reports what it read when it exits
    read = await isolated.db.fetchval(
        "SELECT (SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = 'schedules')"
        " + (SELECT sum(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = 'schedules')"
    )
    assert read <= 6 * 20, f"{read} rows and index entries of schedules read"


def test_the_fire_keys_of_the_database_and_of_the_plan_agree() -> None:
    """asyncpg gives timestamptz values in UTC: the key of a fire time read back is the
    one planned."""
    t = datetime.fromisoformat("2026-03-10T06:00:00+00:00")
    assert fire_key(UUID(int=1), t) == f"schedule\n{UUID(int=1)}\n2026-03-10T06:00:00+00:00"
