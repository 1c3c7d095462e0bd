"""Reading schedules (periodic tasks), for the API and the operator command alike."""

from __future__ import annotations

from uuid import UUID

from shared import pages
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
    """Newest first; ``tenant_id`` None lists every tenant's."""
    return await pages.newest_first(conn, "schedules", COLUMNS, tenant_id, before, limit)
