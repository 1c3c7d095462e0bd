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
EVENT_COLUMNS = "id, last_seq, state, progress, message, attempts, updated_at, trace_id"

# The same columns of the row as it was before an UPDATE, from a CTE named ``old``
# (``WITH old AS (SELECT ... FOR UPDATE)``), for previous_event().
PREVIOUS_COLUMNS = ", ".join(
    f"old.{c.strip()} AS prev_{c.strip()}" for c in EVENT_COLUMNS.split(",")
)


def qualified(alias: str) -> str:
    """EVENT_COLUMNS of the table aliased ``alias`` (for UPDATE ... FROM)."""
    return ", ".join(f"{alias}.{c.strip()}" for c in EVENT_COLUMNS.split(","))


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
        trace_id=row["trace_id"],
    )


def previous_event(row: Row) -> ProgressEvent:
    """The event of the transition before this one, rebuilt from the row's old values.

    Events of consecutive seqs can come from different processes (the relay writes
    "queued", then a worker "running"); the later writer may reach Redis first, and the
    stream refuses an id below its last one. So a claim and a promotion write the
    previous event too, to the stream only (``EventSink.emit(backfill=...)``): a
    duplicate of it is refused, a missing one fills the gap.
    Only used where the previous event carries no ``data`` (queued, retrying)."""
    return event_from_row({c: row[f"prev_{c}"] for c in _EVENT_KEYS})


_EVENT_KEYS = tuple(c.strip() for c in EVENT_COLUMNS.split(","))
