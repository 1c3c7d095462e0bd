"""Schedules in the API: when one fires next after it is made or changed
(services/api/scheduling.py), the request bodies, and the Schedule object."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from services.api.scheduling import first_run, next_run
from services.api.views import schedule_document
from shared.ids import uuid7
from shared.schemas import Schedule, ScheduleRequest, ScheduleUpdate

NOW = datetime(2026, 3, 10, 9, 30, 12, 345000, tzinfo=UTC)


# ---------------------------------------------------------------- next fire after a change


def _current(enabled: bool = True, cron: str = "0 6 * * *", next_run_at: Any = "due") -> Any:
    if next_run_at == "due":
        next_run_at = datetime(2026, 3, 10, 6, 0, tzinfo=UTC)  # due, not yet fired
    return {"enabled": enabled, "cron": cron, "next_run_at": next_run_at}


def test_a_new_schedule_fires_first_at_its_first_time_after_now() -> None:
    new = ScheduleRequest(name="n", cron="0 6 * * *", type="demo.noop")
    assert first_run(new, NOW) == datetime(2026, 3, 11, 6, 0, tzinfo=UTC)
    off = ScheduleRequest(name="n", cron="0 6 * * *", type="demo.noop", enabled=False)
    assert first_run(off, NOW) is None


def test_disabling_clears_the_next_fire() -> None:
    assert next_run(ScheduleUpdate(enabled=False), _current(), NOW) is None
    assert next_run(ScheduleUpdate(enabled=False, cron="* * * * *"), _current(), NOW) is None


def test_enabled_again_it_fires_at_the_first_time_after_now_none_made_up_for() -> None:
    current = _current(enabled=False, next_run_at=None)
    assert next_run(ScheduleUpdate(enabled=True), current, NOW) == datetime(
        2026, 3, 11, 6, 0, tzinfo=UTC
    )


def test_a_new_cron_fires_at_its_first_time_after_now() -> None:
    got = next_run(ScheduleUpdate(cron="*/20 * * * *"), _current(), NOW)
    assert got == datetime(2026, 3, 10, 9, 40, tzinfo=UTC)
    # A disabled schedule's new cron waits for it to be enabled.
    assert next_run(ScheduleUpdate(cron="*/20 * * * *"), _current(enabled=False), NOW) is None


def test_other_changes_keep_a_fire_already_due() -> None:
    """New args, or a repeat of what the schedule already says, must not push a fire
    that is due (a worker has not fired it yet) past now: it would be lost."""
    due = _current()["next_run_at"]
    for change in (
        ScheduleUpdate(args={"seconds": 2}),
        ScheduleUpdate(enabled=True),
        ScheduleUpdate(cron="0 6 * * *"),
        ScheduleUpdate(),
    ):
        assert next_run(change, _current(), NOW) == due, change


# ---------------------------------------------------------------- bodies and documents


def test_a_schedule_request_takes_a_task_requests_fields_with_their_bounds() -> None:
    new = ScheduleRequest.model_validate(
        {"name": "nightly", "cron": "@daily", "type": "demo.sleep", "args": {"seconds": 1}}
    )
    task = new.task()
    assert task.type == "demo.sleep" and task.args == {"seconds": 1}
    # Only what the schedule sets counts as the request's own: the type's defaults fill
    # in the rest.
    assert task.model_fields_set == {"type", "args", "priority"}
    own = ScheduleRequest.model_validate(
        {"name": "n", "cron": "@daily", "type": "t", "max_attempts": 2, "timeout_s": 9}
    ).task()
    assert (own.max_attempts, own.timeout_s) == (2, 9.0)
    assert {"max_attempts", "timeout_s"} <= own.model_fields_set


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"cron": "@daily", "type": "t"}, ("name",)),
        ({"name": "n", "type": "t"}, ("cron",)),
        ({"name": "n", "cron": "@daily"}, ("type",)),
        ({"name": "", "cron": "@daily", "type": "t"}, ("name",)),
        ({"name": "a\nb", "cron": "@daily", "type": "t"}, ("name",)),
        ({"name": "n" * 201, "cron": "@daily", "type": "t"}, ("name",)),
        ({"name": "n", "cron": "*" * 201, "type": "t"}, ("cron",)),
        ({"name": "n", "cron": "@daily", "type": "t", "priority": 10}, ("priority",)),
        ({"name": "n", "cron": "@daily", "type": "t", "max_attempts": 0}, ("max_attempts",)),
        ({"name": "n", "cron": "@daily", "type": "t", "timeout_s": 0}, ("timeout_s",)),
        ({"name": "n", "cron": "@daily", "type": "t", "enabled": "yes"}, ("enabled",)),
        ({"name": "n", "cron": "@daily", "type": "t", "delay_s": 5}, ("delay_s",)),
        ({"name": "n", "cron": "@daily", "type": "t", "args": []}, ("args",)),
    ],
)
def test_a_bad_schedule_request_is_refused_at_its_field(
    body: dict[str, Any], loc: tuple[str, ...]
) -> None:
    with pytest.raises(ValidationError) as info:
        ScheduleRequest.model_validate(body)
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_an_update_takes_only_what_may_change() -> None:
    assert ScheduleUpdate.model_validate({}).model_fields_set == set()
    for body in ({"name": "x"}, {"type": "t"}, {"enabled": 1}, {"cron": ""}, {"args": 3}):
        with pytest.raises(ValidationError):
            ScheduleUpdate.model_validate(body)


def test_the_schedule_document_is_the_schedule_object() -> None:
    row = {
        "id": uuid7(),
        "tenant_id": uuid7(),
        "name": "daily",
        "cron": "0 6 * * *",
        "type": "demo.noop",
        "args": {"a": [1, 2]},
        "priority": 3,
        "max_attempts": None,
        "timeout_s": 30.0,
        "enabled": True,
        "next_run_at": datetime(2026, 3, 11, 6, 0, tzinfo=UTC),
        "last_run_at": datetime(2026, 3, 10, 6, 0, tzinfo=UTC),
        "last_task_id": uuid7(),
        "last_error": None,
        "created_at": NOW,
        "updated_at": NOW,
    }
    doc = schedule_document(row)
    assert "tenant_id" not in doc
    assert doc["links"] == {"self": f"/v1/schedules/{row['id']}"}
    assert doc["next_run_at"] == "2026-03-11T06:00:00.000Z"
    assert Schedule.model_validate(doc).model_dump(mode="json") == doc
    assert orjson.loads(orjson.dumps(doc)) == doc
