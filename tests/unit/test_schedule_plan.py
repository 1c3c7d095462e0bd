"""What a due schedule's fire makes (services/worker/schedules.py): its task as a
submission of it would be, or the reason it makes none; its next fire time; its key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from services.api import requests as rq
from services.api.problems import ProblemException
from services.worker.schedules import Skipped, fire_key, plan
from shared.ids import uuid7
from shared.schemas import TaskRequest

NOW = datetime(2026, 3, 10, 9, 30, 12, 345000, tzinfo=UTC)
SLEEP_SCHEMA = {
    "type": "object",
    "properties": {"seconds": {"type": "number"}, "steps": {"type": "integer", "default": 1}},
    "required": ["seconds"],
    "additionalProperties": False,
}


def _type(name: str, schema: dict[str, Any] | None = None, **defaults: Any) -> dict[str, Any]:
    """A task_types row."""
    return {
        "name": name,
        "args_schema": schema if schema is not None else {"type": "object"},
        "max_attempts": defaults.get("max_attempts"),
        "timeout_s": defaults.get("timeout_s"),
        "seen_at": NOW,
    }


def _due(**fields: Any) -> dict[str, Any]:
    """A due schedule's row (DUE_COLUMNS): every day at 06:00, due at today's."""
    row = {
        "id": uuid7(),
        "tenant_id": uuid7(),
        "name": "daily",
        "cron": "0 6 * * *",
        "type": "demo.sleep",
        "args": {"seconds": 1},
        "priority": 0,
        "max_attempts": None,
        "timeout_s": None,
        "next_run_at": datetime(2026, 3, 10, 6, 0, tzinfo=UTC),
    }
    row.update(fields)
    return row


TYPES = {"demo.sleep": _type("demo.sleep", SLEEP_SCHEMA, max_attempts=3, timeout_s=60.0)}


# ---------------------------------------------------------------- firing


def test_a_due_schedule_makes_its_task_with_its_types_defaults() -> None:
    """The task is what a submission of the schedule's fields would store: the type's
    own attempts and timeout where the schedule sets none, its args as given (a
    submission stores them as sent too)."""
    row = _due()
    [fire] = plan([row], TYPES, NOW, new_id=lambda: UUID(int=7), new_trace=lambda: "ab" * 16)
    assert fire.task is not None and fire.skipped is None and fire.error is None
    assert fire.task.id == UUID(int=7) and fire.task.trace_id == "ab" * 16
    assert fire.task.request == TaskRequest(
        type="demo.sleep", args={"seconds": 1}, max_attempts=3, timeout_s=60.0
    )
    assert (fire.schedule_id, fire.tenant_id, fire.due_at) == (
        row["id"],
        row["tenant_id"],
        row["next_run_at"],
    )
    assert fire.next_run_at == datetime(2026, 3, 11, 6, 0, tzinfo=UTC)
    assert fire.key == fire_key(row["id"], row["next_run_at"])


def test_the_schedules_own_values_win_over_its_types() -> None:
    row = _due(priority=7, max_attempts=9, timeout_s=5.5)
    [fire] = plan([row], TYPES, NOW)
    assert fire.task is not None
    request = fire.task.request
    assert (request.priority, request.max_attempts, request.timeout_s) == (7, 9, 5.5)


def test_fires_missed_while_no_worker_ran_make_one_task_and_the_next_is_after_now() -> None:
    """Due ten days ago: one fire (for that due time), and next at the first fire time
    after now, not at the next of the ten missed ones."""
    due = NOW - timedelta(days=10)
    [fire] = plan([_due(next_run_at=due)], TYPES, NOW)
    assert fire.task is not None and fire.due_at == due
    assert fire.next_run_at == datetime(2026, 3, 11, 6, 0, tzinfo=UTC)
    [later] = plan([_due(cron="*/15 * * * *", next_run_at=due)], TYPES, NOW)
    assert later.next_run_at == datetime(2026, 3, 10, 9, 45, tzinfo=UTC)


def test_each_fire_gets_a_task_id_and_trace_of_its_own() -> None:
    fires = plan([_due(), _due(), _due()], TYPES, NOW)
    tasks = [f.task for f in fires if f.task is not None]
    assert len({t.id for t in tasks}) == 3 and len({t.trace_id for t in tasks}) == 3


def test_a_type_no_longer_registered_makes_no_task_and_says_why() -> None:
    [fire] = plan([_due(type="gone.type")], TYPES, NOW)
    assert fire.task is None and fire.skipped is Skipped.UNKNOWN_TYPE
    assert fire.error == (
        "the fire of 2026-03-10T06:00:00.000Z made no task: type: unknown task type 'gone.type'"
    )
    # Passed over until its next fire time: not retried at every poll.
    assert fire.next_run_at == datetime(2026, 3, 11, 6, 0, tzinfo=UTC)


def test_args_the_types_schema_now_refuses_make_no_task() -> None:
    """The type's schema changed since the schedule was made: checked at each fire, as
    a submission would be."""
    [fire] = plan([_due(args={"seconds": "soon", "extra": 1})], TYPES, NOW)
    assert fire.task is None and fire.skipped is Skipped.INVALID_ARGS
    assert fire.error is not None
    assert "args: Additional properties are not allowed ('extra' was unexpected)" in fire.error
    assert "args.seconds: 'soon' is not of type 'number'" in fire.error
    [missing] = plan([_due(args={})], TYPES, NOW)
    assert missing.error is not None and "args.seconds: Field required" in missing.error


def test_a_type_whose_schema_is_not_one_makes_no_task() -> None:
    types = {"demo.sleep": _type("demo.sleep", {"type": "no-such-type"})}
    [fire] = plan([_due()], types, NOW)
    assert fire.task is None and fire.skipped is Skipped.UNKNOWN_TYPE
    assert (
        fire.error is not None and "args schema of task type 'demo.sleep' is invalid" in fire.error
    )


def test_a_cron_that_cannot_be_read_makes_no_task_and_no_next_fire() -> None:
    """Only a change behind the API's back can store one: the schedule waits for a
    PATCH of its cron rather than being looked at again and again."""
    [fire] = plan([_due(cron="0 6 * *")], TYPES, NOW)
    assert fire.task is None and fire.skipped is Skipped.INVALID_CRON
    assert fire.next_run_at is None
    assert fire.error is not None and "'0 6 * *'" in fire.error and "4 fields" in fire.error


def test_values_no_task_request_takes_make_no_task() -> None:
    [fire] = plan([_due(priority=42)], TYPES, NOW)
    assert fire.task is None and fire.skipped is Skipped.INVALID_TASK
    assert (
        fire.error is not None and "priority: Input should be less than or equal to 9" in fire.error
    )


def test_one_bad_schedule_leaves_the_others_of_its_batch_alone() -> None:
    rows = [_due(), _due(type="gone.type"), _due()]
    fires = plan(rows, TYPES, NOW)
    assert [f.schedule_id for f in fires] == [r["id"] for r in rows]
    assert [f.task is not None for f in fires] == [True, False, True]


def test_a_refused_fire_says_why_and_keeps_its_next_time() -> None:
    [fire] = plan([_due()], TYPES, NOW)
    refused = fire.refused("the database refused its task: out of range")
    assert refused.task is None and refused.skipped is Skipped.INVALID_TASK
    assert refused.error == (
        "the fire of 2026-03-10T06:00:00.000Z made no task: the database refused its task:"
        " out of range"
    )
    assert refused.next_run_at == fire.next_run_at
    again = fire.stored_before()
    assert again.task is None and again.repeated and again.error is None


def test_fire_keys_are_one_per_schedule_and_time_and_no_client_can_send_one() -> None:
    a, b = uuid7(), uuid7()
    t = datetime(2026, 3, 10, 6, 0, tzinfo=UTC)
    keys = {fire_key(a, t), fire_key(b, t), fire_key(a, t + timedelta(minutes=1))}
    assert len(keys) == 3
    assert fire_key(a, t) == fire_key(a, t.astimezone(UTC))
    for key in keys:
        request = _request_with_key(key)
        with pytest.raises(ProblemException) as refused:
            rq.idempotency_key(request)
        assert refused.value.problem.status == 422
    # Nor a batch's keys (one line feed and a number after it).
    assert all(k not in rq.batch_keys("schedule", 3) for k in keys)


def _request_with_key(key: str) -> Any:
    return make_mocked_request("POST", "/v1/tasks", headers=CIMultiDict({"Idempotency-Key": key}))
