"""Pages of a table keyed by UUIDv7, newest first, for the API's lists and the operator
command's alike."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from shared.outbox import Connection
from shared.taskrows import Row


async def newest_first(
    conn: Connection,
    table: str,
    columns: str,
    tenant_id: UUID | None,
    before: UUID | None,
    limit: int,
) -> list[Row]:
    """``columns`` of ``table``'s rows, newest first, from before the cursor ``before``;
    ``tenant_id`` None reads every tenant's. Each filter is spelled out only when given:
    a prepared statement's generic plan cannot use an index for
    ``($1 IS NULL OR tenant_id = $1)``."""
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
            f"SELECT {columns} FROM {table} {condition} ORDER BY id DESC LIMIT ${len(args)}",
            *args,
        )
    )
