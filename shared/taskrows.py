"""Turning task rows into progress events: every state change is an event, and its seq
is the row's ``last_seq`` after the UPDATE that made the change."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import asyncpg

from shared.schemas import ProgressEvent, TaskState

# A task row as asyncpg returns it, or any mapping of the same columns (tests).
Row: TypeAlias = asyncpg.Record | Mapping[str, Any]

# What an UPDATE ... RETURNING needs for event_from_row.
EVENT_COLUMNS = "id, last_seq, state, progress, message, attempts, updated_at, trace_id"

# The same columns of the row as it was before an UPDATE, from a CTE named ``old``
# (``WITH old AS (SELECT ...)``), for previous_events().
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


def previous_events(rows: Iterable[Row]) -> list[ProgressEvent]:
    """The events of the transitions before these, rebuilt from the rows' old values.

    Events of consecutive seqs can come from different processes (the relay writes
    "queued", then a worker "running"); the later writer may reach Redis first, and the
    stream refuses an id below its last one. So a claim and a promotion write the
    previous event too, to the stream only (``EventSink.emit(backfill=...)``): a
    duplicate of it is refused, a missing one fills the gap.

    The old values may be read without a lock (the claim's are: locking cost more than
    the rest of the statement); a row whose old values are not the version just before
    the update (a concurrent writer got in between) gives no event rather than a wrong
    one. Only used where the previous event carries no ``data`` (queued, retrying)."""
    return [
        event_from_row({c: row[f"prev_{c}"] for c in _EVENT_KEYS})
        for row in rows
        if row["prev_last_seq"] == row["last_seq"] - 1
    ]


_EVENT_KEYS = tuple(c.strip() for c in EVENT_COLUMNS.split(","))
