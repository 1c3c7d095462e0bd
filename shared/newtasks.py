"""Storing new tasks: each task row (state queued, seq 1) and its first outbox row, in
one statement. The API's submissions and the worker's scheduled fires both store
theirs through ``insert``, so a task is stored one way whoever makes it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from shared.outbox import Connection
from shared.schemas import TaskMessage, TaskRequest, encode_task_message
from shared.taskrows import Row

TASK_COLUMNS = (
    "id, tenant_id, type, args, state, progress, message, result, error, attempts, "
    "max_attempts, priority, timeout_s, created_at, started_at, finished_at, updated_at, "
    "next_attempt_at, last_seq, request_hash, trace_id"
)

# The unique index a taken idempotency key violates (shared/migrations/0001_init.sql).
IDEMPOTENCY_INDEX = "tasks_idempotency"


# Tasks and their first outbox rows, built once. A row due now is claimed for $14
# seconds (NULL: not claimed) by the process whose relay key is $15 (NULL: none), which
# hands it to its relay to publish at once. $9 is each task's idempotency key (NULL:
# none, the array padded). A key taken fails the whole statement, not just its row (no
# ON CONFLICT): a batch whose keys meet an earlier one's stores none of its tasks.
_INSERT = f"""
WITH u AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[],
                         $5::int[], $6::int[], $7::float8[], $8::float8[],
                         $11::text[], $12::jsonb[], $13::bytea[], $9::text[])
        AS u(tenant_id, id, type, args, max_attempts, priority, timeout_s,
             delay_s, trace_id, backoff, body, idempotency_key)
), t AS (
    INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts,
                       priority, timeout_s, next_attempt_at, last_seq,
                       idempotency_key, request_hash, trace_id, backoff)
    SELECT u.id, u.tenant_id, u.type, u.args, 'queued', u.max_attempts, u.priority,
           u.timeout_s,
           CASE WHEN u.delay_s > 0
                THEN now() + make_interval(secs => u.delay_s) END,
           1, u.idempotency_key, $10, u.trace_id, u.backoff
    FROM u
    RETURNING {TASK_COLUMNS}
), o AS (
    INSERT INTO outbox (task_id, attempt, body, available_at, claimed_until, claimed_by,
                        priority)
    SELECT t.id, 1, u.body, coalesce(t.next_attempt_at, now()),
           CASE WHEN t.next_attempt_at IS NULL THEN now() + make_interval(secs => $14) END,
           CASE WHEN t.next_attempt_at IS NULL THEN $15::int END,
           u.priority
    FROM t JOIN u ON u.id = t.id
    RETURNING id, task_id
)
SELECT t.*, o.id AS outbox_id FROM t JOIN o ON o.task_id = t.id
"""


@dataclass(frozen=True)
class NewTask:
    id: UUID
    request: TaskRequest
    trace_id: str | None = None


def bodies(tenant_ids: Sequence[UUID], tasks: Sequence[NewTask]) -> list[bytes]:
    """The first attempt's message of each task, encoded."""
    return [
        encode_task_message(
            TaskMessage(
                task_id=t.id,
                tenant_id=tenant_id,
                type=t.request.type,
                attempt=1,
                trace_id=t.trace_id,
            )
        )
        for tenant_id, t in zip(tenant_ids, tasks, strict=True)
    ]


async def insert(
    conn: Connection,
    tenant_ids: Sequence[UUID],
    tasks: Sequence[NewTask],
    encoded: Sequence[bytes],
    *,
    idempotency_keys: Sequence[str] | None = None,
    request_hash: bytes | None = None,
    claim_s: float | None = None,
    owner: int | None = None,
) -> list[Row]:
    """Insert tasks and their first outbox rows (messages ``encoded``, see ``bodies``);
    their rows (TASK_COLUMNS and ``outbox_id``). A row due now is claimed for
    ``claim_s`` seconds by ``owner`` when given, else left to any relay's poll (the
    caller wakes them). A taken idempotency key raises asyncpg's UniqueViolationError
    on IDEMPOTENCY_INDEX, and nothing is inserted."""
    reqs = [t.request for t in tasks]
    return list(
        await conn.fetch(
            _INSERT,
            list(tenant_ids),
            [t.id for t in tasks],
            [r.type for r in reqs],
            [r.args for r in reqs],
            [r.max_attempts for r in reqs],
            [r.priority for r in reqs],
            [r.timeout_s for r in reqs],
            [r.delay_s for r in reqs],
            None if idempotency_keys is None else list(idempotency_keys),
            request_hash,
            [t.trace_id for t in tasks],
            [r.backoff.model_dump() if r.backoff else None for r in reqs],
            list(encoded),
            claim_s,
            owner,
        )
    )
