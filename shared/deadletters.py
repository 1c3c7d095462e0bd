"""Dead letters: messages that could not be processed, kept in PostgreSQL with the
reason, listed and redriven by the API (per tenant) and the ``longhaul dlq`` CLI (all)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from shared import outbox, pages
from shared.ids import uuid7
from shared.outbox import Connection
from shared.schemas import TaskMessage, encode_task_message, format_ts
from shared.states import RERUNNABLE
from shared.taskrows import Row

COLUMNS = "id, tenant_id, task_id, reason, detail, attempts, last_error, created_at, redriven_at"

# The reason of a task that failed with its attempts run out (the others are the
# worker's and the broker's: malformed, unknown_type, delivery_limit, ...).
EXHAUSTED = "attempts_exhausted"


class Redrive(enum.Enum):
    DONE = "done"
    MISSING = "missing"
    ALREADY = "already redriven"
    NO_TASK = "no task to run again"  # none recorded, or purged since
    NOT_FINISHED = "its task is not failed or cancelled"


@dataclass(frozen=True)
class RedriveResult:
    outcome: Redrive
    dead_letter: Row | None = None
    task: Row | None = None


async def keep_exhausted(conn: Connection, messages: Sequence[TaskMessage]) -> str:
    """Keep the last attempt's message of tasks that failed with their attempts run out
    as dead letters, with the task's error: listed with the poison messages, and
    redriven the same way. Call in the transaction that failed the tasks. The INSERT's
    status ("INSERT 0 <n>")."""
    if not messages:
        return "INSERT 0 0"
    return await conn.execute(
        """
        INSERT INTO dead_letters (id, tenant_id, task_id, reason, detail, body, attempts,
                                  last_error)
        SELECT u.id, t.tenant_id, t.id, $4,
               left(format('%s of %s attempts failed; the last: %s', t.attempts,
                           t.max_attempts, t.error->>'message'), 2000),
               u.body, t.attempts, t.error
        FROM unnest($1::uuid[], $2::uuid[], $3::bytea[]) AS u(id, task_id, body)
        JOIN tasks t ON t.id = u.task_id
        """,
        [uuid7() for _ in messages],
        [m.task_id for m in messages],
        [encode_task_message(m) for m in messages],
        EXHAUSTED,
    )


async def list_page(
    conn: Connection, tenant_id: UUID | None, before: UUID | None, limit: int
) -> list[Row]:
    """Newest first; ``tenant_id`` None lists every tenant's and those of no tenant."""
    return await pages.newest_first(conn, "dead_letters", COLUMNS, tenant_id, before, limit)


async def redrive_blocker(
    conn: Connection, dead_letter_id: UUID, tenant_id: UUID
) -> Redrive | None:
    """What would stop a redrive now, read without locks; None if it would go ahead.
    For refusing before admission (back pressure): redrive() decides under its locks."""
    row = await conn.fetchrow(
        "SELECT d.redriven_at, d.task_id, t.state FROM dead_letters d"
        " LEFT JOIN tasks t ON t.id = d.task_id AND t.tenant_id = d.tenant_id"
        " WHERE d.id = $1 AND d.tenant_id = $2",
        dead_letter_id,
        tenant_id,
    )
    if row is None:
        return Redrive.MISSING
    if row["redriven_at"] is not None:
        return Redrive.ALREADY
    if row["task_id"] is None or row["state"] is None:
        return Redrive.NO_TASK
    if row["state"] not in RERUNNABLE:
        return Redrive.NOT_FINISHED
    return None


async def redrive(
    conn: Connection, dead_letter_id: UUID, tenant_id: UUID | None, task_columns: str
) -> RedriveResult:
    """Run the dead letter's task again as its next attempt, once. Call in a transaction."""
    letter = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM dead_letters WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)"
        " FOR UPDATE",
        dead_letter_id,
        tenant_id,
    )
    if letter is None:
        return RedriveResult(Redrive.MISSING)
    if letter["redriven_at"] is not None:
        return RedriveResult(Redrive.ALREADY, letter)
    if letter["task_id"] is None or letter["tenant_id"] is None:
        # No tenant, no task: a message naming an unknown tenant names no task of ours.
        return RedriveResult(Redrive.NO_TASK, letter)
    task = await outbox.rerun(conn, letter["task_id"], letter["tenant_id"], task_columns)
    if task is None:
        # Either the task is still running or queued, or it was purged (retention).
        gone = await conn.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND tenant_id = $2)",
            letter["task_id"],
            letter["tenant_id"],
        )
        return RedriveResult(Redrive.NO_TASK if gone else Redrive.NOT_FINISHED, letter)
    letter = await conn.fetchrow(
        f"UPDATE dead_letters SET redriven_at = now() WHERE id = $1 RETURNING {COLUMNS}",
        dead_letter_id,
    )
    return RedriveResult(Redrive.DONE, letter, task)


def as_json(row: Row) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "task_id": str(row["task_id"]) if row["task_id"] else None,
        "reason": row["reason"],
        "detail": row["detail"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "created_at": format_ts(row["created_at"]),
        "redriven_at": format_ts(row["redriven_at"]) if row["redriven_at"] else None,
    }
