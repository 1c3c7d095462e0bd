"""When a schedule fires next, once created or changed: the first fire time after the
change, by the database's clock. Pure."""

from __future__ import annotations

from datetime import datetime

from shared import cron
from shared.schemas import ScheduleRequest, ScheduleUpdate
from shared.taskrows import Row


def first_run(new: ScheduleRequest, now: datetime) -> datetime | None:
    """A new schedule's first fire time: none while it is disabled."""
    return cron.next_after(new.cron, now) if new.enabled else None


def next_run(change: ScheduleUpdate, current: Row, now: datetime) -> datetime | None:
    """A schedule's next fire time after ``change`` to its ``current`` row (enabled,
    cron, next_run_at). Enabled again, or with a new expression, it fires next at the
    first fire time after now: the fires it was disabled for are not made up for, and a
    new expression's times start from now. Anything else (new args, a repeat of what it
    already says) leaves it as it was, so a fire already due is not lost."""
    enabled = current["enabled"] if change.enabled is None else change.enabled
    expression = current["cron"] if change.cron is None else change.cron
    if not enabled:
        return None
    if not current["enabled"] or expression != current["cron"]:
        return cron.next_after(expression, now)
    next_at: datetime | None = current["next_run_at"]
    return next_at
