"""Task rows as the contract's Task object. Pure."""

from __future__ import annotations

from typing import Any

from shared.schemas import Task, TaskError, TaskLinks
from shared.taskrows import Row


def task_from_row(row: Row, events_url: str) -> Task:
    error: Any = row["error"]
    return Task(
        id=row["id"],
        type=row["type"],
        args=row["args"],
        state=row["state"],
        progress=row["progress"],
        message=row["message"],
        result=row["result"],
        error=TaskError.model_validate(error) if error else None,
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        priority=row["priority"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        next_attempt_at=row["next_attempt_at"],
        last_seq=row["last_seq"],
        links=TaskLinks(self=f"/v1/tasks/{row['id']}", events=events_url),
    )
