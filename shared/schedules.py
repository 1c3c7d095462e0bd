"""Reading schedules (periodic tasks), for the API and the operator command alike."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from shared.outbox import Connection
from shared.taskrows import Row

COLUMNS = (
    "id, tenant_id, name, cron, type, args, priority, max_attempts, timeout_s, enabled,"
    " next_run_at, last_run_at, last_task_id, last_error, created_at, updated_at"
)

# The unique constraint a name taken by another of the tenant's schedules violates
# (shared/migrations/0015_schedules.sql).
NAME_CONSTRAINT = "schedules_name"


async def list_page(
    conn: Connection, tenant_id: UUID | None, before: UUID | None, limit: int
) -> list[Row]:
    """Newest first; ``tenant_id`` None lists every tenant's. As dead letters' pages,
    each filter spelled out only when given, so that the index serves the plan."""
    where: list[str] = []
    args: list[Any] = []
    for clause, value in (("tenant_id = ${}", tenant_id), ("id < ${}", before)):
        if value is not None:
            args.append(value)
            where.append(clause.format(len(args)))
    args.append(limit)
    condition = f"WHERE {' AND '.join(where)}" if where else ""
    return list(
        await conn.fetch(
            f"SELECT {COLUMNS} FROM schedules {condition} ORDER BY id DESC LIMIT ${len(args)}",
            *args,
        )
    )
