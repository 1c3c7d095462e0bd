"""A registered task type as tasks of it are admitted: its args validator and its own
defaults. The API (a submission, a schedule) and the worker's scheduler (each fire)
check a task against its type through ``check`` here, so both refuse the same. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from shared.schemas import ProblemError, TaskRequest
from shared.taskrows import Row

# What a task_types row gives type_info().
TYPE_COLUMNS = "name, args_schema, max_attempts, timeout_s, seen_at"


@dataclass(frozen=True)
class TaskTypeInfo:
    name: str
    args_schema: dict[str, Any]
    validator: Draft202012Validator
    # The type's own defaults (``@task(max_attempts=..., timeout_s=...)``), if it set them.
    max_attempts: int | None = None
    timeout_s: float | None = None
    # When a worker running the type last said so (its lease heartbeat); None if none
    # has since the column was added.
    last_seen_at: datetime | None = None

    def defaults_for(self, task: TaskRequest) -> TaskRequest:
        """``task`` with the type's defaults where the request set no value of its own."""
        update: dict[str, Any] = {
            field: value
            for field, value in (("max_attempts", self.max_attempts), ("timeout_s", self.timeout_s))
            if value is not None and field not in task.model_fields_set
        }
        return task.model_copy(update=update) if update else task

    def errors(self, args: dict[str, Any], prefix: list[str | int]) -> list[ProblemError]:
        return [
            _problem_error(err, prefix)
            for err in sorted(self.validator.iter_errors(args), key=lambda e: list(e.absolute_path))
        ]


def type_info(row: Row) -> TaskTypeInfo:
    """The type of a task_types row (TYPE_COLUMNS). Raises jsonschema's SchemaError for
    an args schema that is not one (no worker's @task makes such a one)."""
    schema = row["args_schema"]
    Draft202012Validator.check_schema(schema)
    return TaskTypeInfo(
        row["name"],
        schema,
        Draft202012Validator(schema),
        row["max_attempts"],
        row["timeout_s"],
        row["seen_at"],
    )


def check(
    info: TaskTypeInfo | None, task: TaskRequest, loc: Sequence[str | int]
) -> tuple[TaskRequest, list[ProblemError]]:
    """``task`` as it will run (its type's defaults where it set none), and why it may
    not: its type unknown (``info`` None), or args its type's schema refuses. ``loc``:
    where the task is in the request (``["body"]``)."""
    if info is None:
        return task, [ProblemError(loc=[*loc, "type"], msg=f"unknown task type {task.type!r}")]
    return info.defaults_for(task), info.errors(task.args, [*loc, "args"])


def _problem_error(err: ValidationError, prefix: list[str | int]) -> ProblemError:
    """``err`` located at its value; a missing property at the property (as pydantic
    locates a missing field), not at the object that lacks it."""
    loc = [*prefix, *err.absolute_path]
    required = err.validator_value
    if (
        err.validator == "required"
        and isinstance(err.instance, dict)
        and isinstance(required, list)
    ):
        # jsonschema names the property only in its message, one error per property.
        for name in required:
            if name not in err.instance and err.message == f"{name!r} is a required property":
                return ProblemError(loc=[*loc, name], msg="Field required")
    return ProblemError(loc=loc, msg=err.message)
