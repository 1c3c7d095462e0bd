"""Turning task rows into progress events: every state change is an event, and its seq
is the row's ``last_seq`` after the UPDATE that made the change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import asyncpg

from shared.schemas import ProgressEvent, TaskState

# A task row as asyncpg returns it, or any mapping of the same columns (tests).
Row: TypeAlias = asyncpg.Record | Mapping[str, Any]

# What an UPDATE ... RETURNING needs for event_from_row.
EVENT_COLUMNS = "id, last_seq, state, progress, message, attempts, updated_at"


def event_from_row(row: Row, *, data: Any = None, snapshot: bool = False) -> ProgressEvent:
    return ProgressEvent(
        task_id=row["id"],
        seq=row["last_seq"],
        state=TaskState(row["state"]),
        progress=row["progress"],
        message=row["message"],
        data=data,
        attempt=row["attempts"],
        ts=row["updated_at"],
        snapshot=snapshot,
    )
