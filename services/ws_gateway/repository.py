"""The gateway's only SQL: the task row a subscription is checked and snapshotted from,
the rows' latest seqs (and whether they ended) the sweep compares its subscribers with,
and whether the API keys behind tokens and open streams are still active."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from shared.groupcommit import GroupCommit
from shared.liveness import beat
from shared.schemas import TaskState
from shared.taskrows import qualified

Key = tuple[UUID, UUID]  # (task id, tenant id)


class Head(NamedTuple):
    """Where a task's row is: its latest event seq, and whether that event ended it."""

    seq: int
    final: bool


_CHUNK = 5000


class TaskRepository:
    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        # Subscribes come in bursts (a page of tasks, a reconnect): the rows of the
        # moment's subscribes are read in one query.
        self._reads: GroupCommit[Key, Mapping[str, Any] | None] = GroupCommit(
            self._rows, name="task-row-reads"
        )

    async def task_row(self, task_id: UUID, tenant_id: UUID) -> Mapping[str, Any] | None:
        """The row of a task of this tenant, or None: another tenant's task and an unknown
        id look the same from outside."""
        return await self._reads.submit((task_id, tenant_id))

    async def _rows(self, keys: list[Key]) -> list[Mapping[str, Any] | None]:
        rows = await self._fetch(
            f"SELECT {qualified('t')}, t.tenant_id FROM unnest($1::uuid[], $2::uuid[])"
            " AS k(id, tenant_id) JOIN tasks t ON t.id = k.id AND t.tenant_id = k.tenant_id",
            [task_id for task_id, _ in keys],
            [tenant_id for _, tenant_id in keys],
        )
        found = {(r["id"], r["tenant_id"]): dict(r) for r in rows}
        return [found.get(key) for key in keys]

    async def heads(self, task_ids: Sequence[UUID]) -> dict[UUID, Head]:
        """The latest event seq of each task that still exists, and whether the task has
        ended, a few thousand per query."""
        out: dict[UUID, Head] = {}
        for start in range(0, len(task_ids), _CHUNK):
            beat()  # the sweep's: a query per chunk, each up to the timeout
            rows = await self._fetch(
                "SELECT id, last_seq, state FROM tasks WHERE id = ANY($1::uuid[])",
                task_ids[start : start + _CHUNK],
            )
            out.update((r["id"], Head(r["last_seq"], TaskState(r["state"]).terminal)) for r in rows)
        return out

    async def active_keys(self, key_ids: Sequence[str]) -> set[str]:
        """Those of the API keys ``key_ids`` that exist and are not revoked."""
        rows = await self._fetch(
            "SELECT key_id FROM api_keys WHERE key_id = ANY($1::text[]) AND revoked_at IS NULL",
            key_ids,
        )
        return {r["key_id"] for r in rows}

    async def aclose(self) -> None:
        """Wait for the reads in flight (shutdown)."""
        await self._reads.aclose()

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        # The wait for a connection bounded too: Pool.fetch's is not, and a sweep queued
        # behind a burst of subscribes would be taken for hung (shared.liveness).
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await conn.fetch(query, *args, timeout=self._timeout)

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1", timeout=self._timeout)
