"""The fault suite's task types: every execution of ``fault.ledger`` writes one row to a
ledger table in the run's database, so the tests can count side effects per attempt;
``fault.watched`` notes in Redis when each execution starts, ends or is stopped, in one
list a task, for tests that cut its worker off from PostgreSQL.

Loaded by the worker with ``--tasks tests.faults.ledger_tasks`` (run from the repo root).
The ledger write is the task's *side effect*: it is deliberately not in the worker's
transaction, exactly like a user's HTTP call or e-mail would not be."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import asyncpg
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from services.worker.sdk import TaskContext, task

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS fault_ledger (
    -- One id per handler execution: a retried INSERT of the same execution (after a
    -- dropped connection) cannot count twice, but two executions always count as two.
    exec_id  uuid PRIMARY KEY,
    task_id  uuid NOT NULL,
    attempt  integer NOT NULL,
    pid      integer NOT NULL,
    ts       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS fault_ledger_by_task ON fault_ledger (task_id, attempt);
"""

# How long the handler keeps trying to write its ledger row while PostgreSQL restarts.
_WRITE_DEADLINE_S = 60.0


class LedgerArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sleep_s: float = Field(default=0.0, ge=0, le=60)


class _Ledger:
    """One connection per worker process, opened lazily and reopened after a failure."""

    def __init__(self) -> None:
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def record(self, exec_id: uuid.UUID, task_id: uuid.UUID, attempt: int) -> None:
        deadline = time.monotonic() + _WRITE_DEADLINE_S
        while True:
            try:
                async with self._lock:
                    if self._conn is None or self._conn.is_closed():
                        self._conn = await asyncpg.connect(
                            os.environ["LONGHAUL_DATABASE_URL"], timeout=5
                        )
                    await self._conn.execute(
                        "INSERT INTO fault_ledger (exec_id, task_id, attempt, pid) "
                        "VALUES ($1, $2, $3, $4) ON CONFLICT (exec_id) DO NOTHING",
                        exec_id,
                        task_id,
                        attempt,
                        os.getpid(),
                        timeout=5,
                    )
                return
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


_ledger = _Ledger()


@task("fault.ledger", max_attempts=20)
async def ledger(ctx: TaskContext, args: LedgerArgs) -> dict[str, int]:
    """Record this execution, then work for ``sleep_s`` so faults land mid-run."""
    await _ledger.record(uuid.uuid4(), ctx.task_id, ctx.attempt)
    if args.sleep_s:
        await asyncio.sleep(args.sleep_s / 2)
        await ctx.report_progress(0.5, "half way")
        await asyncio.sleep(args.sleep_s / 2)
    return {"attempt": ctx.attempt, "pid": os.getpid()}


def watched_key(task_id: uuid.UUID) -> str:
    """The Redis list of ``fault.watched`` notes: ``start|done|stopped:attempt:pid``."""
    return f"longhaul-test:watched:{task_id}"


@task("fault.watched", max_attempts=5)
async def watched(ctx: TaskContext, args: LedgerArgs) -> dict[str, int]:
    """Work for ``sleep_s``, noting in Redis (in order) when it starts, ends, or is
    stopped (cancelled): its worker may be cut off from PostgreSQL, not from Redis."""
    redis = Redis.from_url(os.environ["LONGHAUL_REDIS_URL"])
    key = watched_key(ctx.task_id)

    async def note(what: str) -> None:
        await redis.rpush(key, f"{what}:{ctx.attempt}:{os.getpid()}")
        await redis.expire(key, 600)

    try:
        await note("start")
        try:
            await asyncio.sleep(args.sleep_s)
        except asyncio.CancelledError:
            await note("stopped")
            raise
        await note("done")
    finally:
        await redis.aclose()
    return {"attempt": ctx.attempt, "pid": os.getpid()}
