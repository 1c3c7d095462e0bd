"""The gateway's only SQL: the task row a subscription is checked and snapshotted from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import asyncpg

from shared.taskrows import EVENT_COLUMNS


class TaskRepository:
    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def task_row(self, task_id: UUID, tenant_id: UUID) -> Mapping[str, Any] | None:
        """The row of a task of this tenant, or None: another tenant's task and an unknown
        id look the same from outside."""
        row = await self._pool.fetchrow(
            f"SELECT {EVENT_COLUMNS} FROM tasks WHERE id = $1 AND tenant_id = $2",
            task_id,
            tenant_id,
            timeout=self._timeout,
        )
        return None if row is None else dict(row)

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1", timeout=self._timeout)
