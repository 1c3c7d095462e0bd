"""The task types this worker runs: the built-ins plus the specs found in user modules."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

from services.worker.sdk import TaskSpec, spec_of, where
from shared.errors import ConfigError
from shared.schemas import TASK_TYPE_RULE, is_task_type

BUILTIN_MODULE = "services.worker.builtin"


class Registry:
    def __init__(self, specs: Iterable[TaskSpec]) -> None:
        self._specs: dict[str, TaskSpec] = {}
        for spec in specs:
            if not is_task_type(spec.name):  # a spec made without @task
                raise ConfigError(
                    f"task type {spec.name!r} of {where(spec.handler)}: not a task type name"
                    f" ({TASK_TYPE_RULE})"
                )
            first = self._specs.setdefault(spec.name, spec)
            if first is not spec:
                raise ConfigError(
                    f"task type {spec.name!r} is defined twice: by {where(first.handler)}"
                    f" and by {where(spec.handler)}"
                )

    @classmethod
    def load(cls, modules: Iterable[str]) -> Registry:
        """Import the built-ins and each named module; a module that cannot be imported
        or defines no task stops the worker with one line."""
        specs: list[TaskSpec] = []
        for name in [BUILTIN_MODULE, *modules]:
            try:
                module = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - any import failure is a config error
                raise ConfigError(
                    f"--tasks {name}: cannot import: {type(exc).__name__}: {exc}"
                ) from None
            found = list(_specs_in(module))
            if not found:
                raise ConfigError(f"--tasks {name}: no @task functions in {module.__file__}")
            specs.extend(found)
        return cls(specs)

    def get(self, name: str) -> TaskSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[TaskSpec]:
        return list(self._specs.values())

    def schemas(self) -> Mapping[str, dict[str, Any]]:
        return {name: spec.args_schema() for name, spec in self._specs.items()}

    def __len__(self) -> int:
        return len(self._specs)


def _specs_in(module: ModuleType) -> Iterable[TaskSpec]:
    for value in vars(module).values():
        spec = spec_of(value)
        if spec is not None:
            yield spec
