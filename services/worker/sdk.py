"""The worker SDK: what a user's own task module imports.

    from pydantic import BaseModel
    from services.worker.sdk import PermanentError, TaskContext, task

    class ResizeArgs(BaseModel):
        url: str
        width: int = 512

    @task("media.resize", max_attempts=3)
    async def resize(ctx: TaskContext, args: ResizeArgs) -> dict[str, str]:
        await ctx.report_progress(0.5, "downloaded")
        return {"url": args.url}

Run it with ``python -m services.worker --tasks my.module``. The decorator only attaches a
spec to the function; the worker finds specs in the modules it loads, so importing a task
module has no side effects and registers nothing globally."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar, get_type_hints
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from shared.backoff import Backoff
from shared.schemas import TASK_TYPE_RULE, is_task_type

# What a handler module imports from here; Backoff too, so that `mypy --strict` on the
# user's module finds it exported (it lives in shared.backoff).
__all__ = [
    "Backoff",
    "EmptyArgs",
    "PermanentError",
    "RetryableError",
    "TaskContext",
    "TaskFailure",
    "TaskSpec",
    "task",
]

SPEC_ATTRIBUTE = "__longhaul_task__"


class TaskFailure(Exception):
    """Base of the errors a handler raises on purpose; ``type`` lands in ``Task.error.type``."""

    retryable = True

    def __init__(self, message: str, *, type: str | None = None) -> None:
        super().__init__(message)
        self.type = type or self.__class__.__name__


class RetryableError(TaskFailure):
    """Try again later (with backoff), while attempts remain. Any exception a handler
    raises that is not a PermanentError is treated the same way."""


class PermanentError(TaskFailure):
    """Fail the task now: no retry can succeed (bad input, a refused request)."""

    retryable = False


class Progress(Protocol):
    async def __call__(self, progress: float, message: str | None, data: Any) -> None: ...


@dataclass
class TaskContext:
    """What a handler knows of its run, and how it reports progress."""

    task_id: UUID
    type: str
    tenant_id: UUID
    attempt: int
    max_attempts: int
    deadline: datetime
    _progress: Progress

    async def report_progress(
        self, progress: float, message: str | None = None, data: Any = None
    ) -> None:
        """Report ``progress`` in 0.0..1.0 (clamped; never decreasing within an attempt).

        Cheap to call often: reports are coalesced to a few per second per task, the
        last one is always delivered, and state changes are never coalesced away."""
        await self._progress(progress, message, data)


class EmptyArgs(BaseModel):
    """Args of a task that takes none: ``{}``."""

    model_config = ConfigDict(extra="forbid")


ArgsT = TypeVar("ArgsT", bound=BaseModel)
Handler = Callable[[TaskContext, Any], Awaitable[Any]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    handler: Handler
    args_model: type[BaseModel]
    max_attempts: int | None = None
    timeout_s: float | None = None
    backoff: Backoff | None = None

    def args_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()


def task(
    name: str,
    *,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    backoff: Backoff | None = None,
) -> Callable[
    [Callable[[TaskContext, ArgsT], Awaitable[Any]]], Callable[[TaskContext, ArgsT], Awaitable[Any]]
]:
    """Declare an ``async def handler(ctx, args)`` as the task type ``name``.

    ``args`` is validated by the pydantic model its annotation names. ``max_attempts``
    and ``timeout_s`` are defaults for tasks of this type that do not set their own;
    ``backoff`` overrides the worker's retry backoff for this type."""

    def decorate(
        fn: Callable[[TaskContext, ArgsT], Awaitable[Any]],
    ) -> Callable[[TaskContext, ArgsT], Awaitable[Any]]:
        def refused(why: str) -> TypeError:
            # Raised when the module is imported: the worker stops with this one line.
            return TypeError(f"@task({name!r}) on {where(fn)}: {why}")

        # The API's rule: a type it would refuse to create tasks of must not register.
        if not is_task_type(name):
            raise refused(f"not a task type name ({TASK_TYPE_RULE})")
        if not inspect.iscoroutinefunction(fn):
            raise refused("must be an async def")
        params = list(inspect.signature(fn).parameters)
        if len(params) != 2:
            raise refused("must take (ctx, args)")
        hints = get_type_hints(fn)
        model = hints.get(params[1], EmptyArgs)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise refused(f"annotate args with a pydantic model, not {model!r}")
        # The ranges a request may set: the API gives these to requests that set none.
        if max_attempts is not None and not 1 <= max_attempts <= 100:
            raise refused(f"max_attempts must be 1..100, not {max_attempts}")
        if timeout_s is not None and not 0 < timeout_s <= 7 * 24 * 3600:
            raise refused("timeout_s must be > 0 and <= 7 days")
        spec = TaskSpec(name, fn, model, max_attempts, timeout_s, backoff)
        setattr(fn, SPEC_ATTRIBUTE, spec)
        return fn

    return decorate


def where(fn: Callable[..., Any]) -> str:
    """A handler as an error names it: ``module.qualname``."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def spec_of(obj: object) -> TaskSpec | None:
    spec = getattr(obj, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, TaskSpec) else None
