"""Periodic tasks end to end: schedules made through the Python client, come due (their
next_run_at put in the past, as after days with no worker running), are fired by two
real workers into tasks that run to succeeded: one task per schedule, whichever worker
fired it, and each schedule's next fire time moved past the fire. A disabled schedule
is not fired; one whose type is gone makes no task and says why."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest

from longhaul import Client, LonghaulError
from services.worker.schedules import fire_key
from shared import cron
from shared.ids import uuid7
from shared.schemas import TaskState
from tests.conftest import Isolated
from tests.support import System, eventually, free_port

DAILY = "0 6 * * *"
MADE = 12


async def _metric(http: aiohttp.ClientSession, port: int, name: str) -> float:
    """A counter of the worker whose metrics are on ``port`` (0 while not written)."""
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


async def test_due_schedules_fire_once_each_with_two_workers_into_tasks_that_succeed(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    db = isolated.db
    # A database of the test's own: no other test's schedule comes due in it. Both
    # workers look for due schedules every 50 ms or so, so that they meet on them.
    system = System(isolated.deployment.env(schedule_poll_s="0.05"))
    second_port = free_port()
    try:
        await system.start_api()
        await system.start_worker()
        await system.start_worker(worker_metrics_port=str(second_port))
        async with Client(system.api_url, isolated.tenant.key) as client:
            # Made disabled: none can come due by its own clock while the test sets up.
            made = [
                await client.create_schedule(f"report-{i}", DAILY, "demo.noop", enabled=False)
                for i in range(MADE)
            ]
            off = await client.create_schedule("off", DAILY, "demo.noop", enabled=False)
            assert all(s.next_run_at is None for s in [*made, off])
            listed = [s.id async for s in client.schedules(page=5)]
            assert listed == [off.id, *reversed([s.id for s in made])]

            gone = uuid7()  # its type was never registered: only the database can hold it
            await db.execute(
                "INSERT INTO schedules (id, tenant_id, name, cron, type, next_run_at)"
                " VALUES ($1, $2, 'gone', $3, 'gone.type', now() - interval '1 day')",
                gone,
                isolated.tenant.id,
                DAILY,
            )
            # The disabled one is due before all others: a fire that did not look at
            # `enabled` would take it first.
            await db.execute(
                "UPDATE schedules SET next_run_at = now() - interval '4 days' WHERE id = $1",
                off.id,
            )
            due = {
                r["id"]: r["next_run_at"]
                for r in await db.fetch(
                    "UPDATE schedules SET enabled = true,"
                    " next_run_at = now() - interval '3 days'"
                    " WHERE id = ANY($1::uuid[]) RETURNING id, next_run_at",
                    [s.id for s in made],
                )
            }
            assert len(due) == MADE

            async def all_fired() -> list[asyncpg.Record] | None:
                rows = await db.fetch(
                    "SELECT * FROM schedules WHERE tenant_id = $1", isolated.tenant.id
                )
                by_id = {r["id"]: r for r in rows}
                done = all(by_id[i]["last_task_id"] is not None for i in due)
                return rows if done and by_id[gone]["last_error"] is not None else None

            rows = {r["id"]: r for r in await eventually(all_fired, what="every schedule fired")}

            async def succeeded(task_id: UUID) -> Any:
                task = await client.get(task_id)
                return task if task.state.terminal else None

            for schedule_id, due_at in due.items():
                row = rows[schedule_id]
                task = await eventually(lambda t=row["last_task_id"]: succeeded(t))
                assert (task.state, task.type, task.result) == (
                    TaskState.SUCCEEDED,
                    "demo.noop",
                    {"ok": True},
                )
                # The three missed fires made one task, for the fire time that came
                # due; the next fire time is the first after the fire.
                assert (row["last_run_at"], row["last_error"]) == (due_at, None)
                assert row["next_run_at"] == cron.next_after(DAILY, task.created_at)
                schedule = await client.get_schedule(schedule_id)
                assert schedule.last_task_id == task.id and schedule.next_run_at is not None

            # One task per schedule, under its fire's key: none fired twice by the two
            # workers, and nothing else made.
            keys = await db.fetch(
                "SELECT idempotency_key FROM tasks WHERE tenant_id = $1", isolated.tenant.id
            )
            assert sorted(k["idempotency_key"] for k in keys) == sorted(
                fire_key(i, t) for i, t in due.items()
            )
            fires = [
                await _metric(http, port, "longhaul_worker_schedule_fires_total")
                for port in (system.metrics_port, second_port)
            ]
            assert sum(fires) == MADE, fires
            print(f"fires by worker: {fires}")

            # Disabled: not fired, not touched.
            assert (rows[off.id]["last_task_id"], rows[off.id]["last_error"]) == (None, None)
            assert rows[off.id]["next_run_at"] < min(due.values())

            # Its type gone: no task, the reason kept, passed over until its next time.
            missing = rows[gone]
            assert missing["last_task_id"] is None
            assert missing["last_error"].endswith("type: unknown task type 'gone.type'")
            assert missing["next_run_at"] > missing["created_at"]
            skips = [
                await _metric(
                    http, port, 'longhaul_worker_schedule_skips_total{reason="unknown_type"}'
                )
                for port in (system.metrics_port, second_port)
            ]
            assert sum(skips) == 1, skips
            assert all(p.alive() for p in system.procs)

            # Disabled and deleted through the client.
            first = made[0].id
            paused = await client.update_schedule(first, enabled=False)
            assert paused.enabled is False and paused.next_run_at is None
            await client.delete_schedule(first)
            with pytest.raises(LonghaulError) as deleted:
                await client.get_schedule(first)
            assert deleted.value.status == 404
    finally:
        system.stop()
