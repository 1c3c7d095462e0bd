"""Writing to the outbox: the one way any process schedules a task message. Always
called inside the transaction that makes the state change the message announces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias
from uuid import UUID

import asyncpg

from shared.db import NOTIFY_CHANNEL
from shared.schemas import TaskMessage, encode_task_message
from shared.states import RERUNNABLE
from shared.taskrows import Row

Connection: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class Scheduled:
    """The message for ``attempt`` of a task, to publish at ``available_at`` (None: now)."""

    message: TaskMessage
    available_at: datetime | None = None


async def enqueue(conn: Connection, items: Sequence[Scheduled]) -> None:
    if not items:
        return
    # The task's priority routes the message to its lane (see the relay). Read from the
    # task row here, in the caller's transaction, so no path that schedules a message
    # (retries, pass-ons, requeues, reruns, redrives) can route it by anything else.
    await conn.execute(
        """
        INSERT INTO outbox (task_id, attempt, body, available_at, priority)
        SELECT u.task_id, u.attempt, u.body, coalesce(u.available_at, now()),
               coalesce((SELECT t.priority FROM tasks AS t WHERE t.id = u.task_id), 0)
        FROM unnest($1::uuid[], $2::int[], $3::bytea[], $4::timestamptz[])
             AS u(task_id, attempt, body, available_at)
        """,
        [i.message.task_id for i in items],
        [i.message.attempt for i in items],
        [encode_task_message(i.message) for i in items],
        [i.available_at for i in items],
    )
    # Wakes every relay (other processes' too); delivered at commit.
    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)


async def due_count(conn: Connection, cap: int) -> int:
    """How many rows are due and not yet published, counted up to ``cap``: tasks accepted
    that are not in the queue yet, part of the backlog the API's back pressure limits
    (a count past the limit would only cost more when the broker is away)."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE available_at <= now() LIMIT $1) AS due",
        cap,
    )
    return count


async def delayed_count(conn: Connection, cap: int) -> int:
    """How many rows are not yet due (delayed tasks, retries in their backoff), counted
    up to ``cap``: the store of scheduled work the API's back pressure bounds. The index
    ``outbox_due`` (available_at, id) serves it while few rows are delayed; when most
    are, PostgreSQL reads the table instead. Either way it stops at ``cap`` rows, so a
    count costs at most that many, however large the outbox grows."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE available_at > now() LIMIT $1)"
        " AS delayed",
        cap,
    )
    return count


# What next_attempt() reads of a task row.
MESSAGE_COLUMNS = "id, tenant_id, type, attempts, trace_id"


def message_of(row: Row, attempt: int) -> TaskMessage:
    """The message of ``attempt`` of a task row (MESSAGE_COLUMNS)."""
    return TaskMessage(
        task_id=row["id"],
        tenant_id=row["tenant_id"],
        type=row["type"],
        attempt=attempt,
        trace_id=row["trace_id"],
    )


def next_attempt(row: Row, available_at: datetime | None = None) -> Scheduled:
    """The next attempt's message of a task row (MESSAGE_COLUMNS)."""
    return Scheduled(message_of(row, row["attempts"] + 1), available_at)


_RERUN_FROM = ", ".join(sorted(f"'{s.value}'" for s in RERUNNABLE))


async def rerun(conn: Connection, task_id: UUID, tenant_id: UUID, returning: str) -> Row | None:
    """Queue a failed or cancelled task of ``tenant_id`` again as its next attempt (POST
    /retry, a dead letter's redrive, the letter's tenant). Returns the row
    (``returning`` columns, and MESSAGE_COLUMNS for the message) or None when the task
    is not failed or cancelled."""
    row = await conn.fetchrow(
        f"""
        UPDATE tasks SET state = 'queued', result = NULL, error = NULL,
            progress = 0, message = NULL, finished_at = NULL,
            cancel_requested_at = NULL, next_attempt_at = NULL,
            max_attempts = greatest(max_attempts, attempts + 1),
            last_seq = last_seq + 1, updated_at = now()
        WHERE id = $1 AND tenant_id = $2 AND state IN ({_RERUN_FROM})
        RETURNING {returning}, {MESSAGE_COLUMNS}
        """,
        task_id,
        tenant_id,
    )
    if row is not None:
        await enqueue(conn, [next_attempt(row)])
    return row
