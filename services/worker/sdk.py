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

A plain ``def handler(ctx: SyncTaskContext, args)`` runs in a thread of the worker's own
pool (services/worker/threads.py), for blocking code; it learns of its stop from
``ctx.cancelled``, since a thread cannot be interrupted.

Run it with ``python -m services.worker --tasks my.module``. The decorator only attaches a
spec to the function; the worker finds specs in the modules it loads, so importing a task
module has no side effects and registers nothing globally."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar, get_type_hints, overload
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from shared.backoff import Backoff
from shared.schemas import TASK_TYPE_RULE, is_task_type

# What a handler module imports from here; Backoff too, so that `mypy --strict` on the
# user's module finds it exported (it lives in shared.backoff).
__all__ = [
    "Backoff",
    "CancelSignal",
    "EmptyArgs",
    "PermanentError",
    "RetryableError",
    "SyncTaskContext",
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


class CancelSignal:
    """Whether a ``def`` handler's attempt was told to stop: cancelled, past its timeout,
    its lease lost, or its worker stopping past its grace period (when an ``async def``
    handler would get ``asyncio.CancelledError``). Safe to read from any thread."""

    __slots__ = ("_event",)

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        # ``if ctx.cancelled:`` reads as meant; an object's default truth would stop
        # every handler at its first check.
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, woken at once by the stop; True if told."""
        return self._event.wait(timeout)


class SyncProgress(Protocol):
    def __call__(self, progress: float, message: str | None, data: Any) -> None: ...


@dataclass
class SyncTaskContext:
    """What a plain ``def`` handler knows of its run, from its own thread. Every field
    and method is safe to use from that thread; nothing here reaches the event loop
    except through ``report_progress``, which hops onto it and waits there."""

    task_id: UUID
    type: str
    tenant_id: UUID
    attempt: int
    max_attempts: int
    deadline: datetime
    cancelled: CancelSignal
    _progress: SyncProgress

    def report_progress(
        self, progress: float, message: str | None = None, data: Any = None
    ) -> None:
        """As :meth:`TaskContext.report_progress`, from the handler's thread: returns
        once the event loop has taken the report (written it, or held it back to
        coalesce), and raises ``TypeError`` / ``ValueError`` here for ``data`` that is
        not JSON or is too large. Once ``ctx.cancelled`` is set, reports are dropped
        (the one it waits for then too): the stop decided the attempt's outcome."""
        self._progress(progress, message, data)


class EmptyArgs(BaseModel):
    """Args of a task that takes none: ``{}``."""

    model_config = ConfigDict(extra="forbid")


ArgsT = TypeVar("ArgsT", bound=BaseModel)
R = TypeVar("R")
# An ``async def`` handler, or a plain ``def`` one (``threaded``) taking a SyncTaskContext.
Handler = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    handler: Handler
    args_model: type[BaseModel]
    max_attempts: int | None = None
    timeout_s: float | None = None
    backoff: Backoff | None = None
    # A plain ``def``: run in a thread of the worker's pool, with a SyncTaskContext.
    threaded: bool = False

    def args_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()


class Declare(Protocol):
    """What ``task(...)`` returns: a decorator of either kind of handler, typed so that
    mypy holds each to its own context (a ``def`` given a TaskContext would never
    await its reports)."""

    @overload
    def __call__(
        self, fn: Callable[[TaskContext, ArgsT], Awaitable[R]]
    ) -> Callable[[TaskContext, ArgsT], Awaitable[R]]: ...

    @overload
    def __call__(
        self, fn: Callable[[SyncTaskContext, ArgsT], R]
    ) -> Callable[[SyncTaskContext, ArgsT], R]: ...


def task(
    name: str,
    *,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    backoff: Backoff | None = None,
) -> Declare:
    """Declare a handler ``(ctx, args)`` as the task type ``name``: an ``async def``
    taking a TaskContext, or a plain ``def`` taking a SyncTaskContext, run in a thread.

    ``args`` is validated by the pydantic model its annotation names. ``max_attempts``
    and ``timeout_s`` are defaults for tasks of this type that do not set their own;
    ``backoff`` overrides the worker's retry backoff for this type."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        def refused(why: str) -> TypeError:
            # Raised when the module is imported: the worker stops with this one line.
            return TypeError(f"@task({name!r}) on {where(fn)}: {why}")

        # The API's rule: a type it would refuse to create tasks of must not register.
        if not is_task_type(name):
            raise refused(f"not a task type name ({TASK_TYPE_RULE})")
        threaded = not inspect.iscoroutinefunction(fn)
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise refused("must be a def or an async def, not a generator")
        if threaded and inspect.iscoroutinefunction(inspect.unwrap(fn)):
            # A def wrapper of a coroutine function would run in a thread and return
            # its coroutine, never awaited.
            raise refused("wraps an async def but is not one: make the wrapper async")
        params = list(inspect.signature(fn).parameters)
        if len(params) != 2:
            raise refused("must take (ctx, args)")
        hints = get_type_hints(fn)
        context = hints.get(params[0])
        if threaded and context is TaskContext:
            raise refused("a def handler takes a SyncTaskContext (or make it async def)")
        if not threaded and context is SyncTaskContext:
            raise refused("an async def handler takes a TaskContext")
        model = hints.get(params[1], EmptyArgs)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise refused(f"annotate args with a pydantic model, not {model!r}")
        # The ranges a request may set: the API gives these to requests that set none.
        if max_attempts is not None and not 1 <= max_attempts <= 100:
            raise refused(f"max_attempts must be 1..100, not {max_attempts}")
        if timeout_s is not None and not 0 < timeout_s <= 7 * 24 * 3600:
            raise refused("timeout_s must be > 0 and <= 7 days")
        spec = TaskSpec(name, fn, model, max_attempts, timeout_s, backoff, threaded)
        setattr(fn, SPEC_ATTRIBUTE, spec)
        return fn

    return decorate


def where(fn: Callable[..., Any]) -> str:
    """A handler as an error names it: ``module.qualname``."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def spec_of(obj: object) -> TaskSpec | None:
    spec = getattr(obj, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, TaskSpec) else None
