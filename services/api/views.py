"""Rows as the API's objects: the contract's Task, and the Schedule. Pure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shared.schemas import TaskError, format_ts
from shared.taskrows import Row


def task_document(row: Row, events_url: str) -> dict[str, Any]:
    """The Task object (``shared.schemas.Task``) as JSON values, built from the row
    directly: what ``Task(...).model_dump(mode="json")`` gives, at half the cost (5 µs
    against 9, the encoding to bytes included), and the API renders one per accepted
    task. The row's values are already of the contract's types (the table's checks and
    types see to that); the error, rare, still goes through its model, which drops what
    the contract lacks."""
    error = row["error"]
    task_id = str(row["id"])
    return {
        "id": task_id,
        "type": row["type"],
        "args": row["args"],
        "state": row["state"],
        "progress": row["progress"],
        "message": row["message"],
        "result": row["result"],
        "error": TaskError.model_validate(error).model_dump() if error else None,
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "priority": row["priority"],
        "timeout_s": row["timeout_s"],
        "created_at": format_ts(row["created_at"]),
        "started_at": _ts(row["started_at"]),
        "finished_at": _ts(row["finished_at"]),
        "updated_at": format_ts(row["updated_at"]),
        "next_attempt_at": _ts(row["next_attempt_at"]),
        "last_seq": row["last_seq"],
        "trace_id": row["trace_id"],
        "links": {"self": f"/v1/tasks/{task_id}", "events": events_url},
    }


def schedule_document(row: Row) -> dict[str, Any]:
    """The Schedule object (``shared.schemas.Schedule``) as JSON values."""
    schedule_id = str(row["id"])
    last_task = row["last_task_id"]
    return {
        "id": schedule_id,
        "name": row["name"],
        "cron": row["cron"],
        "type": row["type"],
        "args": row["args"],
        "priority": row["priority"],
        "max_attempts": row["max_attempts"],
        "timeout_s": row["timeout_s"],
        "enabled": row["enabled"],
        "next_run_at": _ts(row["next_run_at"]),
        "last_run_at": _ts(row["last_run_at"]),
        "last_task_id": None if last_task is None else str(last_task),
        "last_error": row["last_error"],
        "created_at": format_ts(row["created_at"]),
        "updated_at": format_ts(row["updated_at"]),
        "links": {"self": f"/v1/schedules/{schedule_id}"},
    }


def _ts(value: datetime | None) -> str | None:
    return None if value is None else format_ts(value)
