"""What the fires of due schedules make: a task each, stored under a key of its
schedule and fire time (so a fire is never stored twice), or the reason it makes none;
and when each schedule fires next. Pure.

A schedule fires once for its due time, however many of its fire times passed while
no worker ran: it next fires at its first fire time after now. Missed fires are
coalesced into that one task, never replayed."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

from jsonschema.exceptions import SchemaError
from pydantic import ValidationError

from shared import cron, tasktypes
from shared.ids import random_hex, uuid7
from shared.newtasks import NewTask
from shared.schemas import format_ts, schedule_task, summary
from shared.taskrows import Row

# What a due schedule's row gives plan().
DUE_COLUMNS = (
    "id, tenant_id, name, cron, type, args, priority, max_attempts, timeout_s, next_run_at"
)


class Skipped(enum.StrEnum):
    """Why a fire made no task (a metric's label)."""

    UNKNOWN_TYPE = "unknown_type"
    INVALID_ARGS = "invalid_args"
    INVALID_CRON = "invalid_cron"
    # Values no task request takes (changed in the database behind the API's back), or
    # a task the database refused to store.
    INVALID_TASK = "invalid_task"


@dataclass(frozen=True)
class Fire:
    """One due schedule's fire."""

    schedule_id: UUID
    tenant_id: UUID
    # The fire time that came due (the schedule's next_run_at).
    due_at: datetime
    # When it fires next: the first fire time after now; None while its cron cannot be
    # read (it fires again once a PATCH gives it one that can).
    next_run_at: datetime | None
    # The task it makes; None when it makes none.
    task: NewTask | None
    # Why it makes none (and what the schedule's last_error says).
    skipped: Skipped | None = None
    error: str | None = None
    # Its task was stored by an earlier fire of this time: nothing new was.
    repeated: bool = False

    @property
    def key(self) -> str:
        return fire_key(self.schedule_id, self.due_at)

    def refused(self, why: str, reason: Skipped = Skipped.INVALID_TASK) -> Fire:
        """This fire making no task, for ``why``."""
        error = f"the fire of {format_ts(self.due_at)} made no task: {why}"
        return replace(self, task=None, skipped=reason, error=error)

    def stored_before(self) -> Fire:
        """This fire, its task found stored by an earlier fire of its time."""
        return replace(self, task=None, repeated=True)


def fire_key(schedule_id: UUID, due_at: datetime) -> str:
    """The idempotency key of a schedule's task for one fire time. Line feeds: no
    client's key can hold one (printable ASCII only), so none can take a fire's key,
    and a batch's keys hold only one (services/api/requests.py, batch_keys)."""
    return f"schedule\n{schedule_id}\n{due_at.isoformat()}"


def plan(
    due: Sequence[Row],
    types: Mapping[str, Row],
    now: datetime,
    *,
    new_id: Callable[[], UUID] = uuid7,
    new_trace: Callable[[], str] = random_hex,
) -> list[Fire]:
    """The fires of the ``due`` schedules (DUE_COLUMNS) at ``now``, the database's
    time: ``types`` holds the task_types rows of their types (TYPE_COLUMNS) that
    exist. Each task is checked against its type as a submission is (an unknown type
    or args its schema refuses make none), with its type's defaults where the schedule
    sets none."""
    infos: dict[str, tasktypes.TaskTypeInfo | str] = {}
    for name, row in types.items():
        try:
            infos[name] = tasktypes.type_info(row)
        except SchemaError as exc:
            infos[name] = f"the args schema of task type {name!r} is invalid: {exc.message}"
    return [_fire(row, infos, now, new_id, new_trace) for row in due]


def _fire(
    row: Row,
    infos: Mapping[str, tasktypes.TaskTypeInfo | str],
    now: datetime,
    new_id: Callable[[], UUID],
    new_trace: Callable[[], str],
) -> Fire:
    due_at: datetime = row["next_run_at"]

    def skip(reason: Skipped, why: str, next_run_at: datetime | None) -> Fire:
        fire = Fire(row["id"], row["tenant_id"], due_at, next_run_at, None)
        return fire.refused(why, reason)

    try:
        next_run_at = cron.next_after(row["cron"], now)
    except cron.CronError as exc:
        return skip(Skipped.INVALID_CRON, f"its cron expression {row['cron']!r}: {exc}", None)
    try:
        request = schedule_task(
            row["type"], row["args"], row["priority"], row["max_attempts"], row["timeout_s"]
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        return skip(Skipped.INVALID_TASK, f"{where}: {first['msg']}", next_run_at)
    info = infos.get(row["type"])
    if isinstance(info, str):
        return skip(Skipped.UNKNOWN_TYPE, info, next_run_at)
    request, refused = tasktypes.check(info, request, [])
    if refused:
        reason = Skipped.INVALID_ARGS if info is not None else Skipped.UNKNOWN_TYPE
        return skip(reason, summary(refused), next_run_at)
    task = NewTask(id=new_id(), request=request, trace_id=new_trace())
    return Fire(row["id"], row["tenant_id"], due_at, next_run_at, task)
