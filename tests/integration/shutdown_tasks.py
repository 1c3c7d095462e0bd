"""Task types for the tests of abandoned handlers, an async def and a plain def: the
first attempt ignores its cancellation (the def's, ``ctx.cancelled``), and every step of
every execution is recorded in a table of the run's database, in order
(``shutdown_ledger.id``), with the task's state at that step, so a test can tell which
attempt ran when.

Loaded by the worker with ``--tasks tests.integration.shutdown_tasks``."""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from services.worker.sdk import SyncTaskContext, TaskContext, task

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS shutdown_ledger (
    id       bigserial PRIMARY KEY,
    task_id  uuid NOT NULL,
    attempt  integer NOT NULL,
    step     text NOT NULL,  -- start, tick, end
    seen     text  -- the task's state and attempts as the step was recorded
)
"""
RECORD = """
INSERT INTO shutdown_ledger (task_id, attempt, step, seen)
SELECT $1, $2, $3, state || ' ' || attempts FROM tasks WHERE id = $1
"""


class StubbornArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # How long the first attempt runs on once told to stop.
    hold_s: float = Field(ge=0)


@task("test.stubborn", max_attempts=3)
async def stubborn(ctx: TaskContext, args: StubbornArgs) -> int:
    """Attempt 1 ticks until ``hold_s`` after its cancellation, which it ignores; later
    attempts end at once."""
    told = asyncio.Event()
    body = asyncio.create_task(_body(ctx, args.hold_s, told), name="stubborn-body")
    while True:
        try:
            return await asyncio.shield(body)
        except asyncio.CancelledError:
            told.set()


async def _body(ctx: TaskContext, hold_s: float, told: asyncio.Event) -> int:
    conn = await asyncpg.connect(os.environ["LONGHAUL_DATABASE_URL"], timeout=10)
    try:

        async def record(step: str) -> None:
            await conn.execute(RECORD, ctx.task_id, ctx.attempt, step)

        await record("start")
        if ctx.attempt == 1:
            await told.wait()
            loop = asyncio.get_running_loop()
            until = loop.time() + hold_s
            while loop.time() < until:
                await record("tick")
                await asyncio.sleep(0.05)
        await record("end")
        return ctx.attempt
    finally:
        await conn.close()


@task("test.stubborn_thread", max_attempts=3)
def stubborn_thread(ctx: SyncTaskContext, args: StubbornArgs) -> int:
    """test.stubborn as a plain def, run in a thread: attempt 1 ticks until ``hold_s``
    after ctx.cancelled is set, which it otherwise ignores; later attempts end at once.
    It records on an event loop of its thread's own, as blocking code would."""
    with asyncio.Runner() as runner:
        url = os.environ["LONGHAUL_DATABASE_URL"]
        conn = runner.run(asyncpg.connect(url, timeout=10))
        try:

            def record(step: str) -> None:
                runner.run(conn.execute(RECORD, ctx.task_id, ctx.attempt, step))

            record("start")
            if ctx.attempt == 1:
                ctx.cancelled.wait()
                until = time.monotonic() + args.hold_s
                while time.monotonic() < until:
                    record("tick")
                    time.sleep(0.05)
            record("end")
            return ctx.attempt
        finally:
            runner.run(conn.close())
