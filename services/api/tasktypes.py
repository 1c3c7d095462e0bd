"""The task types workers have registered, with their args validators, re-read from
PostgreSQL every few seconds (and at once on a miss, at most once a second). Requests
that find the types stale together share one read: each used to read them (and build
every validator) again."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from services.api.repository import ApiRepository
from shared.schemas import ProblemError, TaskRequest, is_task_type
from shared.singleflight import SingleFlight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskTypeInfo:
    name: str
    args_schema: dict[str, Any]
    validator: Draft202012Validator
    # The type's own defaults (``@task(max_attempts=..., timeout_s=...)``), if it set them.
    max_attempts: int | None = None
    timeout_s: float | None = None
    # When a worker running the type last said so (its lease heartbeat); None if none
    # has since the column was added. As fresh as the cache.
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


class TaskTypes:
    def __init__(self, repo: ApiRepository, refresh_s: float) -> None:
        self._repo = repo
        self._refresh_s = refresh_s
        self._types: dict[str, TaskTypeInfo] = {}
        self._loaded_at = -1e9
        self._reads: SingleFlight[None, None] = SingleFlight("task-types-read")

    async def get(self, name: str) -> TaskTypeInfo | None:
        now = time.monotonic()
        info = self._types.get(name)
        stale = now - self._loaded_at > self._refresh_s
        if stale or (info is None and now - self._loaded_at > 1.0):
            await self.reload()
            info = self._types.get(name)
        return info

    async def all(self) -> list[TaskTypeInfo]:
        if time.monotonic() - self._loaded_at > self._refresh_s:
            await self.reload()
        return list(self._types.values())

    async def reload(self) -> None:
        """Read the types again, or wait for the read in progress."""
        await self._reads.run(None, self._read)

    async def _read(self) -> None:
        types = {}
        for row in await self._repo.task_types():
            if not is_task_type(row["name"]):
                # Registered by a worker of a version that did not check names: no
                # request can name it, so it is not listed as if one could.
                continue
            schema = row["args_schema"]
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                # Not one a worker's @task makes (pydantic's are valid): the type is
                # refused as unknown rather than admitted unchecked.
                log.warning(
                    "task type has an invalid args schema; refusing it",
                    extra={"type": row["name"], "error": exc.message},
                )
                continue
            validator = Draft202012Validator(schema)
            types[row["name"]] = TaskTypeInfo(
                row["name"],
                schema,
                validator,
                row["max_attempts"],
                row["timeout_s"],
                row["seen_at"],
            )
        self._types = types
        self._loaded_at = time.monotonic()
