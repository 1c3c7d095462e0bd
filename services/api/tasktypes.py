"""The task types workers have registered, with their args validators, re-read from
PostgreSQL every few seconds (and at once on a miss, at most once a second). Requests
that find the types stale together share one read: each used to read them (and build
every validator) again."""

from __future__ import annotations

import logging
import time

from jsonschema.exceptions import SchemaError

from services.api.repository import ApiRepository
from shared.schemas import is_task_type
from shared.singleflight import SingleFlight
from shared.tasktypes import TaskTypeInfo, type_info

log = logging.getLogger(__name__)


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
            try:
                types[row["name"]] = type_info(row)
            except SchemaError as exc:
                # Not one a worker's @task makes (pydantic's are valid): the type is
                # refused as unknown rather than admitted unchecked.
                log.warning(
                    "task type has an invalid args schema; refusing it",
                    extra={"type": row["name"], "error": exc.message},
                )
        self._types = types
        self._loaded_at = time.monotonic()
