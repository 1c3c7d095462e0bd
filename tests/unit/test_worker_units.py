"""The worker's pure parts: the progress rate gate, the progress reporter (with fakes of
its write and emit callables), the @task SDK and the registry of task types."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from prometheus_client import REGISTRY
from pydantic import BaseModel, ValidationError

from services.worker import deadletters
from services.worker.app import _leave_abandoned
from services.worker.consumer import Consumer
from services.worker.deadletters import DeadLetterSink
from services.worker.maintenance import heartbeat, lease_watch, reaper
from services.worker.progress import MAX_DATA_BYTES, MAX_MESSAGE, ProgressReporter, StartEvent
from services.worker.ratelimit import RateGate
from services.worker.registry import Registry
from services.worker.repository import Claimed, Renewal
from services.worker.runner import Runner, Running, StopReason, start_handler
from services.worker.sdk import (
    EmptyArgs,
    PermanentError,
    RetryableError,
    SyncTaskContext,
    TaskContext,
    TaskSpec,
    spec_of,
    task,
)
from services.worker.settings import WorkerSettings
from services.worker.threads import HandlerThreads
from shared.backoff import Backoff
from shared.errors import ConfigError
from shared.failpoints import Failpoints
from shared.ids import uuid7
from shared.liveness import Liveness
from shared.schemas import ProgressEvent, TaskMessage, TaskRequest, TaskState
from tests.support import eventually, until, watched_until

# ---------------------------------------------------------------- handler start


async def test_a_handler_that_never_waits_is_done_once_started() -> None:
    """On Python 3.12+ its first step runs at once: the runner then skips the wait."""

    async def at_once() -> int:
        return 7

    handler = start_handler(at_once(), name="handler-x")
    assert handler.done() is (sys.version_info >= (3, 12))
    assert await handler == 7
    assert handler.get_name() == "handler-x"


async def test_a_handler_that_waits_goes_on_as_a_task() -> None:
    steps: list[str] = []
    gate = asyncio.Event()

    async def waits() -> str:
        steps.append("started")
        await gate.wait()
        steps.append("resumed")
        return "done"

    handler = start_handler(waits(), name="handler-y")
    assert not handler.done()
    gate.set()
    assert await handler == "done"
    assert steps == ["started", "resumed"]


# ---------------------------------------------------------------- RateGate


def test_rate_gate_lets_the_first_report_through() -> None:
    """Nothing sent yet: the first report goes at once."""
    assert RateGate(10).wait(now=123.0) == 0.0


def test_rate_gate_holds_back_within_the_interval() -> None:
    """After a send, the next may go one interval later, not before."""
    gate = RateGate(4)  # 0.25 s
    gate.sent(10.0)
    assert gate.wait(10.0) == pytest.approx(0.25)
    assert gate.wait(10.1) == pytest.approx(0.15)
    assert gate.wait(10.25) == 0.0
    assert gate.wait(99.0) == 0.0  # never negative


# ---------------------------------------------------------------- ProgressReporter


class FakeWrite:
    """Stands in for the conditional UPDATE: hands out seqs, or None once fenced."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str | None]] = []
        self.fenced = False
        self.task_id = uuid7()

    async def __call__(self, progress: float, message: str | None) -> ProgressEvent | None:
        self.calls.append((progress, message))
        if self.fenced:
            return None
        return ProgressEvent(
            task_id=self.task_id,
            seq=len(self.calls) + 1,
            state=TaskState.RUNNING,
            progress=progress,
            message=message,
            attempt=1,
            ts=datetime.now(UTC),
        )


class FakeSink:
    """Stands in for EventSink: records what would reach Redis."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    async def emit(self, events: Sequence[ProgressEvent]) -> bool:
        self.events.extend(events)
        return True


def _reporter(max_rate: float = 50.0) -> tuple[ProgressReporter, FakeWrite, FakeSink]:
    write, sink = FakeWrite(), FakeSink()
    return ProgressReporter(write, sink, max_rate=max_rate, name="t"), write, sink  # type: ignore[arg-type]


async def test_a_burst_of_reports_is_coalesced() -> None:
    """1000 reports in a burst produce a handful of writes, and the last one is written."""
    reporter, write, sink = _reporter(max_rate=20)
    for i in range(1, 1001):
        await reporter.report(i / 1000, f"item {i}", None)
    await reporter.close()
    assert 1 <= len(write.calls) <= 3
    assert write.calls[-1] == (1.0, "item 1000")
    assert [e.progress for e in sink.events] == [p for p, _ in write.calls]


async def test_the_last_report_is_delivered_on_close() -> None:
    """A report held back by the rate limit is written by close()."""
    reporter, write, sink = _reporter(max_rate=1)  # one per second: the 2nd is held
    await reporter.report(0.1, "first", None)
    await reporter.report(0.2, "second", {"k": 1})
    assert write.calls == [(0.1, "first")]
    await asyncio.wait_for(reporter.close(), 5)
    assert write.calls == [(0.1, "first"), (0.2, "second")]
    assert sink.events[-1].data == {"k": 1}
    assert sink.events[-1].message == "second"


async def test_a_report_made_during_a_held_back_write_is_not_held_until_close() -> None:
    """The held-back report's write is slow; the handler reports again meanwhile and
    then works on without reporting. That newer report goes out once the rate allows,
    not only when the attempt ends."""
    reporter, write, sink = _reporter(max_rate=20)  # one per 50 ms
    writing, release = asyncio.Event(), asyncio.Event()
    fast = write.__call__

    async def slow_second(progress: float, message: str | None) -> ProgressEvent | None:
        if len(write.calls) == 1:  # the held-back one
            writing.set()
            await release.wait()
        return await fast(progress, message)

    reporter._write = slow_second
    await reporter.report(0.1, "first", None)  # written at once
    await reporter.report(0.2, "second", None)  # held back, then written by the flusher
    await asyncio.wait_for(writing.wait(), 5)
    await reporter.report(0.3, "third", None)  # while the second is being written
    release.set()
    await eventually(until(lambda: len(sink.events) == 3), within=5, what="the third report")
    assert [m for _, m in write.calls] == ["first", "second", "third"]
    await reporter.close()
    assert len(write.calls) == 3


async def test_close_without_pending_report_writes_nothing() -> None:
    """close() after everything was sent does not write again."""
    reporter, write, _ = _reporter()
    await reporter.report(0.5, None, None)
    await reporter.close()
    await reporter.close()
    assert write.calls == [(0.5, None)]


async def test_progress_never_decreases_and_is_clamped() -> None:
    """Lower values are raised to the best so far; values are clamped to 0..1."""
    reporter, write, _ = _reporter(max_rate=1000)
    for value in (-0.5, 0.4, 0.2, 0.7, 0.1, 3.0, 0.9):
        await reporter.report(value, None, None)
        await asyncio.sleep(0.002)
    await reporter.close()
    written = [p for p, _ in write.calls]
    assert written == sorted(written)
    assert written[0] == 0.0
    assert written[-1] == 1.0
    assert all(0.0 <= p <= 1.0 for p in written)


async def test_long_messages_are_truncated() -> None:
    """A huge message is cut to MAX_MESSAGE characters before it is written."""
    reporter, write, _ = _reporter()
    await reporter.report(0.1, "x" * (MAX_MESSAGE * 3), None)
    assert write.calls[0][1] == "x" * MAX_MESSAGE


async def test_fenced_out_stops_writes() -> None:
    """Once a write is refused (the attempt is no longer ours), nothing more is written."""
    reporter, write, sink = _reporter(max_rate=1000)
    await reporter.report(0.1, None, None)
    write.fenced = True
    await asyncio.sleep(0.002)
    await reporter.report(0.2, None, None)
    await reporter.close()
    assert reporter.fenced_out
    calls_when_fenced = len(write.calls)
    for value in (0.3, 0.4, 0.5):
        await reporter.report(value, None, None)
    await reporter.close()
    assert len(write.calls) == calls_when_fenced
    assert [e.progress for e in sink.events] == [0.1]


class BackfillSink:
    """Stands in for EventSink where the backfill matters: records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []

    async def emit(
        self, events: Sequence[ProgressEvent], *, backfill: Sequence[ProgressEvent] = ()
    ) -> bool:
        self.calls.append(([e.seq for e in events], [e.seq for e in backfill]))
        return True


def _event(seq: int) -> ProgressEvent:
    return ProgressEvent(
        task_id=uuid7(),
        seq=seq,
        state=TaskState.RUNNING,
        progress=0.0,
        attempt=1,
        ts=datetime.now(UTC),
    )


async def test_the_start_event_goes_with_the_first_progress_report() -> None:
    """The held start event (seq 1) and the first report (seq 2) reach Redis in one
    call, in order; later reports go alone."""
    sink = BackfillSink()
    start = StartEvent(sink, _event(1), [])  # type: ignore[arg-type]
    write = FakeWrite()  # hands out seqs from 2
    reporter = ProgressReporter(write, start, max_rate=1000, name="t")
    await reporter.report(0.5, None, None)
    await asyncio.sleep(0.002)
    await reporter.report(0.6, None, None)
    await reporter.close()
    assert sink.calls == [([1, 2], []), ([3], [])]


async def test_the_start_event_is_written_once() -> None:
    sink = BackfillSink()
    start = StartEvent(sink, _event(2), [_event(1)])  # type: ignore[arg-type]
    await asyncio.gather(start.emit(), start.emit())  # the runner's timer and a report
    await start.emit([_event(3)])
    assert sink.calls == [([2], [1]), ([], []), ([3], [])]


# ---------------------------------------------------------------- SDK


class ResizeArgs(BaseModel):
    url: str
    width: int = 512


class NotAModel:
    pass


def test_task_attaches_a_spec() -> None:
    """@task returns the function itself with a spec naming its type and args model."""
    backoff = Backoff(base_s=0.1)

    @task("media.resize", max_attempts=3, timeout_s=60, backoff=backoff)
    async def resize(ctx: TaskContext, args: ResizeArgs) -> dict[str, str]:
        return {"url": args.url}

    spec = spec_of(resize)
    assert isinstance(spec, TaskSpec)
    assert (spec.name, spec.args_model, spec.max_attempts, spec.timeout_s) == (
        "media.resize",
        ResizeArgs,
        3,
        60,
    )
    assert spec.backoff is backoff
    assert spec.handler is resize
    assert spec.args_schema()["properties"]["url"]["type"] == "string"


def test_unannotated_args_default_to_empty_args() -> None:
    """A handler whose args carry no annotation takes EmptyArgs ({})."""

    @task("x.empty")
    async def empty(ctx, args):  # type: ignore[no-untyped-def]
        return None

    spec = spec_of(empty)
    assert spec is not None and spec.args_model is EmptyArgs
    with pytest.raises(ValueError, match="Extra inputs"):
        EmptyArgs.model_validate({"unexpected": 1})


def test_task_declares_a_plain_def_to_run_in_a_thread() -> None:
    """A plain def registers as an async def does, marked to run in the worker's pool."""

    @task("reports.build", max_attempts=2)
    def build(ctx: SyncTaskContext, args: ResizeArgs) -> dict[str, str]:
        return {"url": args.url}

    spec = spec_of(build)
    assert spec is not None and spec.handler is build
    assert (spec.name, spec.args_model, spec.max_attempts, spec.threaded) == (
        "reports.build",
        ResizeArgs,
        2,
        True,
    )

    @task("reports.build_async")
    async def build_async(ctx: TaskContext, args: ResizeArgs) -> None:
        return None

    declared = spec_of(build_async)
    assert declared is not None and declared.threaded is False


async def _no_params() -> None:
    return None


async def _one_param(ctx: TaskContext) -> None:
    return None


async def _two_params(ctx: TaskContext, args: ResizeArgs) -> None:
    return None


async def _three_params(ctx: TaskContext, args: ResizeArgs, extra: int) -> None:
    return None


def _def_given_task_context(ctx: TaskContext, args: ResizeArgs) -> None:
    return None


async def _async_given_sync_context(ctx: SyncTaskContext, args: ResizeArgs) -> None:
    return None


def _generator(ctx: SyncTaskContext, args: ResizeArgs) -> Iterator[int]:
    yield 1


async def _async_generator(ctx: TaskContext, args: ResizeArgs) -> AsyncIterator[int]:
    yield 1


@functools.wraps(_two_params)
def _def_wrapping_async(ctx: TaskContext, args: ResizeArgs) -> Any:
    return _two_params(ctx, args)


@pytest.mark.parametrize(
    ("handler", "says"),
    [
        (_def_given_task_context, "a def handler takes a SyncTaskContext"),
        (_async_given_sync_context, "an async def handler takes a TaskContext"),
        (_generator, "not a generator"),
        (_async_generator, "not a generator"),
        (_def_wrapping_async, "wraps an async def but is not one"),
    ],
)
def test_task_refuses_a_handler_that_would_not_run_as_written(handler: Any, says: str) -> None:
    """A def given the async context would call report_progress without awaiting it, an
    async def given the thread's would block its loop; a generator or a def wrapper of
    a coroutine function would return what nobody iterates or awaits."""
    with pytest.raises(TypeError, match=says):
        task("x.wrong")(handler)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"max_attempts": 0}, "max_attempts must be 1..100"),
        ({"max_attempts": 101}, "max_attempts must be 1..100"),
        ({"timeout_s": 0}, "timeout_s must be > 0 and <= 7 days"),
        ({"timeout_s": 8 * 24 * 3600}, "timeout_s must be > 0 and <= 7 days"),
    ],
)
def test_task_refuses_defaults_no_request_could_set(kwargs: dict[str, Any], says: str) -> None:
    """The type's defaults are given to requests as they are: out of a request's range,
    the worker would register what the API must not insert."""
    with pytest.raises(TypeError, match=says):
        task("x.bounds", **kwargs)(_two_params)


_NAMES_THE_API_REFUSES = ["Bad Name!", "", ".x", "-x", ":x", "a" * 129, "a\n", "ü", "a/b"]


@pytest.mark.parametrize("name", _NAMES_THE_API_REFUSES)
def test_task_refuses_a_name_the_api_refuses(name: str) -> None:
    """A type no request can name (the API answers 422) is refused when it is declared,
    naming the function and its module: it registered and listed, never to run."""
    with pytest.raises(TypeError) as info:
        task(name)(_two_params)
    assert str(info.value) == (
        f"@task({name!r}) on {__name__}._two_params: not a task type name"
        " (1 to 128 characters of A-Z a-z 0-9 _ . : -, the first not . : or -)"
    )


@pytest.mark.parametrize("name", [*_NAMES_THE_API_REFUSES, "a" * 128, "_x", "Media.resize:v2-b"])
def test_the_sdk_and_the_api_agree_on_type_names(name: str) -> None:
    """One rule: what @task accepts is what a request's ``type`` may be."""
    try:
        TaskRequest.model_validate({"type": name})
    except ValidationError:
        accepted = False
    else:
        accepted = True
    try:
        task(name)(_two_params)
    except TypeError:
        declared = False
    else:
        declared = True
    assert declared == accepted


@pytest.mark.parametrize("handler", [_no_params, _one_param, _three_params])
def test_task_refuses_wrong_arity(handler: Any) -> None:
    """A handler must take exactly (ctx, args)."""
    with pytest.raises(TypeError, match=r"must take \(ctx, args\)"):
        task("x.arity")(handler)


@pytest.mark.parametrize("annotation", [int, dict, NotAModel])
def test_task_refuses_non_pydantic_args(annotation: type) -> None:
    """The args annotation must be a pydantic model."""

    async def handler(ctx: TaskContext, args: Any) -> None:
        return None

    handler.__annotations__["args"] = annotation
    with pytest.raises(TypeError, match="pydantic model"):
        task("x.bad")(handler)


def test_spec_of_ignores_undecorated_objects() -> None:
    """spec_of() is None for anything @task did not decorate."""

    async def plain(ctx: TaskContext, args: ResizeArgs) -> None:
        return None

    assert spec_of(plain) is None
    assert spec_of(42) is None


def test_task_failures_carry_retryable_and_type() -> None:
    """PermanentError is not retryable, RetryableError is; type defaults to the class name."""
    assert PermanentError("no").retryable is False
    assert RetryableError("again").retryable is True
    assert PermanentError("no").type == "PermanentError"
    assert RetryableError("again", type="flaky").type == "flaky"


# ---------------------------------------------------------------- Registry


@pytest.fixture
def task_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Writes a module under a unique name on sys.path; removes it from sys.modules after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        made.append(name)
        return name

    yield write
    for name in made:
        sys.modules.pop(name, None)


def test_registry_loads_the_builtins() -> None:
    """With no modules, the registry holds the contract's built-in types."""
    registry = Registry.load([])
    assert {"demo.noop", "demo.sleep", "demo.flaky", "demo.fail"} <= set(registry.schemas())
    assert registry.get("demo.noop") is not None
    assert registry.get("nope") is None


def test_registry_loads_a_user_module(task_module: Any) -> None:
    """Specs found in a --tasks module are added to the built-ins."""
    name = task_module(
        "lh_user_tasks_ok",
        """
        from services.worker.sdk import TaskContext, task

        @task("user.hello")
        async def hello(ctx: TaskContext, args) -> str:
            return "hi"
        """,
    )
    registry = Registry.load([name])
    assert registry.get("user.hello") is not None
    assert len(registry) == len(Registry.load([])) + 1


def test_registry_missing_module_is_one_line_config_error() -> None:
    """A module that does not exist stops the worker with one line naming it."""
    with pytest.raises(ConfigError) as info:
        Registry.load(["no_such_module_for_longhaul_tests"])
    text = str(info.value)
    assert "\n" not in text
    assert "no_such_module_for_longhaul_tests" in text
    assert "cannot import" in text


def test_registry_module_that_raises_on_import_is_a_config_error(task_module: Any) -> None:
    """An exception at import time is a ConfigError, not a traceback."""
    name = task_module("lh_user_tasks_broken", "raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="RuntimeError: boom"):
        Registry.load([name])


def test_registry_module_without_tasks_is_refused() -> None:
    """A module that defines no @task is a configuration mistake."""
    with pytest.raises(ConfigError, match="no @task functions"):
        Registry.load(["json"])


def test_registry_refuses_duplicate_names(task_module: Any) -> None:
    """Two different handlers of one type name are refused."""
    name = task_module(
        "lh_user_tasks_dup",
        """
        from services.worker.sdk import TaskContext, task

        @task("demo.noop")
        async def my_noop(ctx: TaskContext, args) -> None:
            return None
        """,
    )
    with pytest.raises(ConfigError) as info:
        Registry.load([name])
    assert str(info.value) == (
        "task type 'demo.noop' is defined twice: by services.worker.builtin.noop"
        " and by lh_user_tasks_dup.my_noop"
    )


def test_registry_same_spec_twice_is_fine() -> None:
    """Loading one module twice (the same spec objects) is not a duplicate."""
    registry = Registry.load(["services.worker.builtin"])
    assert len(registry) == len(Registry.load([]))


def test_registry_constructor_refuses_duplicates() -> None:
    """Registry() itself refuses two specs of one name."""

    async def a(ctx: TaskContext, args: EmptyArgs) -> None:
        return None

    async def b(ctx: TaskContext, args: EmptyArgs) -> None:
        return None

    with pytest.raises(ConfigError, match="defined twice"):
        Registry([TaskSpec("same", a, EmptyArgs), TaskSpec("same", b, EmptyArgs)])


def test_registry_constructor_refuses_a_name_the_api_refuses() -> None:
    """A spec made without @task is held to the same rule."""

    async def a(ctx: TaskContext, args: EmptyArgs) -> None:
        return None

    with pytest.raises(ConfigError, match=r"task type 'Bad Name!' of .*\.a: not a task type"):
        Registry([TaskSpec("Bad Name!", a, EmptyArgs)])


class _FlakyLeases:
    """A repository whose first renewal and first reap fail as PostgreSQL can."""

    def __init__(self) -> None:
        self.renewals = 0
        self.reaps = 0

    async def renew_leases(self, attempts: Any, worker_id: str, lease_s: float) -> Renewal:
        self.renewals += 1
        if self.renewals == 1:
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return Renewal([], [], [])

    async def ping(self) -> None:
        return None

    async def touch_types(self, names: Sequence[str]) -> None:
        return None

    async def reap(self) -> list[Any]:
        self.reaps += 1
        if self.reaps == 1:
            raise asyncpg.QueryCanceledError("canceling statement due to statement timeout")
        if self.reaps == 2:
            raise RuntimeError("a bug of ours")
        return []


async def test_the_heartbeat_and_the_reaper_go_on_after_any_error() -> None:
    """One deadlock (with the worker's own success write) ended the heartbeat for
    good: every lease of the worker then ran out while its tasks ran."""
    repo = _FlakyLeases()
    runner = SimpleNamespace(running={})
    stop = asyncio.Event()
    jobs = [
        asyncio.create_task(heartbeat(repo, runner, "w", 0.03, stop)),  # type: ignore[arg-type]
        asyncio.create_task(reaper(repo, SimpleNamespace(), 0.03, stop)),  # type: ignore[arg-type]
    ]
    # The reaper's interval has a 0.5 s floor: three rounds take up to 1.5 s.
    for _ in range(400):
        if repo.renewals >= 3 and repo.reaps >= 3:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.gather(*jobs)
    assert repo.renewals >= 3 and repo.reaps >= 3


class _ReaperAfterAnOutage:
    """The first reap fails (the database away); the calls are timed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    async def ping(self) -> None:
        self.calls.append(("ping", time.monotonic()))

    async def reap(self) -> list[Any]:
        self.calls.append(("reap", time.monotonic()))
        if len(self.calls) == 1:
            raise ConnectionRefusedError(111, "refused")
        return []


async def test_the_reaper_waits_a_lease_once_the_database_is_back() -> None:
    """Live workers' leases ran out while the database was away: they get a whole lease
    from its return to renew them before the reaper reaps again."""
    repo, stop = _ReaperAfterAnOutage(), asyncio.Event()
    lease_s = 1.2  # rounds every 0.2-0.4 s (lease / 3 with jitter, at least 0.5 s / 2)
    job = asyncio.create_task(reaper(repo, SimpleNamespace(), lease_s, stop))  # type: ignore[arg-type]
    await eventually(until(lambda: len(repo.calls) >= 3), within=10, what="a reap after the ping")
    stop.set()
    await job
    (first, _), (second, back_at), (third, reaped_at) = repo.calls[:3]
    assert (first, second, third) == ("reap", "ping", "reap")
    assert reaped_at - back_at >= lease_s


class _PingFailsOnce:
    """The first reap fails (the database away), then the first ping (not with a
    connection error: the database is back, but refuses the ping)."""

    def __init__(self, ping_error: Exception) -> None:
        self.calls: list[str] = []
        self._ping_error = ping_error

    async def ping(self) -> None:
        self.calls.append("ping")
        if self.calls.count("ping") == 1:
            raise self._ping_error

    async def reap(self) -> list[Any]:
        self.calls.append("reap")
        if len(self.calls) == 1:
            raise ConnectionRefusedError(111, "refused")
        return []


@pytest.mark.parametrize(
    "ping_error",
    [asyncpg.TooManyConnectionsError("sorry, too many clients already"), KeyError("a bug")],
)
async def test_a_failed_ping_after_an_outage_does_not_skip_the_quiet_lease(
    ping_error: Exception,
) -> None:
    """A restart's reconnect storm can refuse the ping: the reaper must not take that
    for the database's return without the quiet lease, and reap live workers' tasks."""
    repo, stop = _PingFailsOnce(ping_error), asyncio.Event()
    job = asyncio.create_task(reaper(repo, SimpleNamespace(), 1.2, stop))  # type: ignore[arg-type]
    await eventually(until(lambda: len(repo.calls) >= 3), within=10, what="a third round")
    stop.set()
    await job
    assert repo.calls[:3] == ["reap", "ping", "ping"]


class _ReaperWithABug:
    """The first reap raises an error of ours, not the database's."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def ping(self) -> None:
        self.calls.append("ping")

    async def reap(self) -> list[Any]:
        self.calls.append("reap")
        if len(self.calls) == 1:
            raise KeyError("a bug of ours")
        return []


async def test_a_reaper_that_failed_on_a_bug_reaps_at_its_next_round() -> None:
    """A bug says nothing of the leases: a dead worker's tasks must not wait a lease
    more for it (no ping, no quiet lease: the next round reaps)."""
    repo, stop = _ReaperWithABug(), asyncio.Event()
    job = asyncio.create_task(reaper(repo, SimpleNamespace(), 1.2, stop))  # type: ignore[arg-type]
    await eventually(until(lambda: len(repo.calls) >= 2), within=10, what="a second round")
    stop.set()
    await job
    assert repo.calls[:2] == ["reap", "reap"]


class _LostAttempt:
    """A renewal that finds one attempt reaped by another worker."""

    def __init__(self, lost: Any) -> None:
        self.lost = lost

    async def renew_leases(self, attempts: Any, worker_id: str, lease_s: float) -> Renewal:
        return Renewal([], [self.lost], [])

    async def touch_types(self, names: Sequence[str]) -> None:
        return None


async def test_the_heartbeat_stops_an_attempt_no_longer_ours() -> None:
    release = asyncio.Event()
    runner, running, spec = _attempt(_returns_anyway(release), cancel_grace_s=1)
    task_id = running.claimed.message.task_id
    runner.running[task_id] = running
    stop = asyncio.Event()
    run = asyncio.create_task(runner._run(spec, running, _Held()))  # type: ignore[arg-type]
    beat = asyncio.create_task(heartbeat(_LostAttempt(task_id), runner, "w", 0.03, stop))  # type: ignore[arg-type]
    try:
        outcome = await asyncio.wait_for(run, 5)
    finally:
        stop.set()
        release.set()
        await beat
    assert running.stop_reason is StopReason.FENCED and outcome.state == "interrupted"


class _RenewsOnly:
    """A renewal that extends only ``kept``'s lease: the others' rows are out of reach
    (this worker cut off from them, as from PostgreSQL)."""

    def __init__(self, kept: Any) -> None:
        self.kept = kept

    async def renew_leases(self, attempts: Any, worker_id: str, lease_s: float) -> Renewal:
        return Renewal([], [], [t for t in attempts if t == self.kept])

    async def touch_types(self, names: Sequence[str]) -> None:
        return None


async def _forever(ctx: TaskContext, args: EmptyArgs) -> None:
    await asyncio.Event().wait()


async def test_a_lease_unrenewed_for_a_lease_stops_its_handler_once() -> None:
    """Another worker's reaper requeues an attempt whose lease ran out, so its handler
    must not run on here: the watch stops it (interrupted, and counted once), while an
    attempt the heartbeat keeps renewing runs on."""
    runner, cut, spec = _attempt(_forever, cancel_grace_s=1)
    row, attempt = dict(cut.claimed.row), cut.claimed.message.attempt
    message = TaskMessage(task_id=uuid7(), tenant_id=uuid7(), type=spec.name, attempt=attempt)
    kept = Running(Claimed(row, message))  # type: ignore[arg-type]
    runner.running = {r.claimed.message.task_id: r for r in (cut, kept)}
    before = REGISTRY.get_sample_value("longhaul_worker_leases_lapsed_total") or 0.0
    stop, lease_s = asyncio.Event(), 0.3
    jobs = [
        asyncio.create_task(heartbeat(_RenewsOnly(message.task_id), runner, "w", lease_s, stop)),  # type: ignore[arg-type]
        asyncio.create_task(lease_watch(runner, lease_s, stop)),
    ]
    runs = [asyncio.create_task(runner._run(spec, r, _Held())) for r in (cut, kept)]  # type: ignore[arg-type]
    try:
        outcome = await asyncio.wait_for(runs[0], 10)
        await asyncio.sleep(2 * lease_s)  # time for a wrong stop of the renewed one
        assert kept.stop_reason is None and not runs[1].done()
    finally:
        kept.stop(StopReason.SHUTDOWN)
        stop.set()
        await asyncio.gather(*jobs, *runs)
    assert cut.stop_reason is StopReason.LAPSED and outcome.state == "interrupted"
    assert outcome.error is not None and "lease lapsed" in outcome.error["message"]
    assert REGISTRY.get_sample_value("longhaul_worker_leases_lapsed_total") == before + 1


async def test_a_fenced_report_stops_the_attempt_and_bad_data_is_refused_at_once() -> None:
    """A report the database refuses as no longer this attempt's (reaped) tells the
    runner, which stops the handler; data that is not JSON, or too large, is refused to
    the handler when it reports, not in a write held back for later."""
    fenced: list[bool] = []
    write, sink = FakeWrite(), FakeSink()
    reporter = ProgressReporter(
        write,  # type: ignore[arg-type]
        sink,
        max_rate=1000,
        name="t",
        on_fenced=lambda: fenced.append(True),
    )
    with pytest.raises(TypeError, match="not JSON"):
        await reporter.report(0.1, None, {"set": {1}})
    with pytest.raises(ValueError, match="bytes"):
        await reporter.report(0.1, None, "x" * (MAX_DATA_BYTES + 1))
    assert write.calls == []
    await reporter.report(0.2, "lone \ud800", None)
    assert write.calls == [(0.2, "lone ?")]  # PostgreSQL text refuses a lone surrogate
    write.fenced = True
    await reporter.report(0.3, None, None)
    await reporter.close()  # the report may be held back by the rate limit
    assert fenced == [True] and reporter.fenced_out


class _Delivery:
    """A dead letter as aio-pika hands it over: process() settles it on exit."""

    body = b"{}"
    headers: dict[str, Any] = {"x-first-death-reason": "delivery_limit"}

    def __init__(self) -> None:
        self.settled: list[str] = []

    @contextlib.asynccontextmanager
    async def process(self, *, requeue: bool) -> AsyncIterator[None]:
        try:
            yield
        except Exception:
            self.settled.append("requeued" if requeue else "dropped")
            raise
        self.settled.append("acked")


class _DatabaseAway:
    async def dead_letter(self, *_: Any, **__: Any) -> None:
        raise ConnectionRefusedError(111, "refused")


async def test_a_dead_letter_not_stored_is_handed_back_after_a_pause() -> None:
    """With PostgreSQL away the broker would redeliver it at once, for as long as the
    outage lasts: it goes back only after a pause."""
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    sink = DeadLetterSink(None, _DatabaseAway(), None, pause=pause)  # type: ignore[arg-type]
    delivery = _Delivery()
    with pytest.raises(ConnectionRefusedError):
        await sink._on_message(delivery)  # type: ignore[arg-type]
    assert pauses == [deadletters.RETRY_S] and delivery.settled == ["requeued"]


# ---------------------------------------------------------------- abandoned handlers


class _Held:
    """Stands in for StartEvent: nothing to write."""

    async def emit(self, events: Sequence[ProgressEvent] = ()) -> None:
        pass


def _abandoned() -> float | None:
    return REGISTRY.get_sample_value("longhaul_worker_abandoned_handlers")


class _Stubborn:
    """A handler that ignores its cancellation until released."""

    def __init__(self) -> None:
        self.started, self.release = asyncio.Event(), asyncio.Event()

    async def __call__(self, ctx: TaskContext, args: EmptyArgs) -> str:
        self.started.set()
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
        return "done"


class _HandBackRepo:
    """Stands in for WorkerRepository: notes each hand-back, and whether the attempt's
    handler had ended by then."""

    def __init__(self) -> None:
        self.handler: asyncio.Task[Any] | None = None
        self.handed_back: list[tuple[int, bool]] = []

    async def hand_back(self, messages: list[TaskMessage], error: dict[str, Any]) -> None:
        assert self.handler is not None
        self.handed_back += [(m.attempt, self.handler.done()) for m in messages]


def _attempt(
    handler: Any,
    cancel_grace_s: float,
    progress_max_rate_per_s: float = 20.0,
    repo: _HandBackRepo | None = None,
    *,
    threaded: bool = False,
) -> tuple[Runner, Running, TaskSpec]:
    """A runner and a claimed attempt of ``handler`` (a plain def's, ``threaded``), for
    ``runner._run``."""
    spec = TaskSpec("t.stubborn", handler, EmptyArgs, threaded=threaded)
    settings = WorkerSettings(
        cancel_grace_s=cancel_grace_s,
        start_event_delay_s=0,
        progress_max_rate_per_s=progress_max_rate_per_s,
    )
    runner = Runner(
        settings,
        repo,  # type: ignore[arg-type]
        FakeSink(),  # type: ignore[arg-type]
        Registry([spec]),
        Failpoints(""),
        "w",
        HandlerThreads(2),
    )
    message = TaskMessage(task_id=uuid7(), tenant_id=uuid7(), type=spec.name, attempt=1)
    row = {"timeout_s": 60.0, "max_attempts": 1, "cancel_requested_at": None, "args": {}}
    return runner, Running(Claimed(row, message)), spec  # type: ignore[arg-type]


def _returns_anyway(release: asyncio.Event) -> Any:
    async def handler(ctx: TaskContext, args: EmptyArgs) -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()
        return "done"

    return handler


@pytest.mark.parametrize("told", [False, True])
@pytest.mark.parametrize("reason", [StopReason.SHUTDOWN, StopReason.CANCELLED])
async def test_a_success_in_the_same_turn_as_a_stop_stands(reason: StopReason, told: bool) -> None:
    """The handler returned, and before the run saw it the drain's grace ran out (or a
    cancel came): it was never told to stop, so its success stands, and a shutdown does
    not hand it back to run again. One that was told to stop and returned anyway is
    stopped."""
    release = asyncio.Event()
    runner, running, spec = _attempt(_returns_anyway(release), cancel_grace_s=1)
    run = asyncio.create_task(runner._run(spec, running, _Held()))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    handler = running.handler
    assert handler is not None
    if told:
        running.stop(reason)
    else:
        # In the turn the handler ends, before the run resumes to look at it.
        handler.add_done_callback(lambda _: running.stop(reason))
        release.set()
    outcome = await run
    if told:
        assert outcome.state == ("cancelled" if reason is StopReason.CANCELLED else "interrupted")
    else:
        assert (outcome.state, outcome.result) == ("succeeded", "done")


async def test_a_handler_ignoring_its_cancellation_is_counted_until_it_ends() -> None:
    """Given up on after the grace period it runs on in the process: the gauge counts it
    until it ends."""
    stubborn = _Stubborn()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=0.05)
    before = _abandoned()
    run = asyncio.create_task(runner._run(spec, running, _Held()))  # type: ignore[arg-type]
    try:
        await stubborn.started.wait()
        running.stop(StopReason.CANCELLED)
        assert (await run).state == "cancelled"
        assert before is not None and _abandoned() == before + 1 and len(runner.abandoned) == 1
        [handler] = runner.abandoned
    finally:
        stubborn.release.set()  # a failed test must not leave it running: the loop would wait
    assert await handler == "done"
    await asyncio.sleep(0)  # the done callbacks
    assert _abandoned() == before and not runner.abandoned


async def test_a_handler_in_its_grace_when_the_drain_gives_up_is_abandoned() -> None:
    """The drain's last step cancels the deliveries still running; a handler told to
    stop that has not ended then is abandoned as at the end of its grace: counted, and
    waited for by shutdown's last wait, which hands its attempt back once it ended."""
    stubborn, repo = _Stubborn(), _HandBackRepo()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=60, repo=repo)
    runner.running[running.claimed.message.task_id] = running
    consumer = Consumer(SimpleNamespace(), runner, timeout=1, prefetch=1)  # type: ignore[arg-type]
    delivery = asyncio.create_task(runner._run(spec, running, _Held()))  # type: ignore[arg-type]
    consumer._tasks.add(delivery)
    before = _abandoned()
    try:
        await stubborn.started.wait()
        # The hand-back wait ends long before the handler's grace would.
        await consumer.drain(grace_s=0, handback_s=0.05)
        assert delivery.cancelled() and running.stop_reason is StopReason.SHUTDOWN
        assert before is not None and _abandoned() == before + 1 and len(runner.abandoned) == 1
        [handler] = runner.abandoned
        repo.handler = handler
        last_wait = asyncio.create_task(
            _leave_abandoned(contextlib.AsyncExitStack(), runner.abandoned, runner.handbacks, 60)
        )
        await asyncio.sleep(0.05)
        assert not last_wait.done() and not handler.done() and not repo.handed_back
    finally:
        stubborn.release.set()
    await asyncio.wait_for(last_wait, 10)  # returns once the handler ended
    assert await handler == "done"
    assert _abandoned() == before and not runner.abandoned
    assert repo.handed_back == [(1, True)]


@pytest.mark.parametrize(
    ("reason", "settled"),
    [
        (None, ("failed", False)),
        (StopReason.CANCELLED, ("cancelled", False)),
        (StopReason.SHUTDOWN, ("interrupted", True)),
    ],
)
async def test_a_timed_out_attempt_waits_for_its_abandoned_handler(
    reason: StopReason | None, settled: tuple[str, bool]
) -> None:
    """Its run settles the timed-out attempt once the handler ended, or at a stop: a
    cancel at once, a stopping worker by the hand-back of its last wait."""
    stubborn, repo = _Stubborn(), _HandBackRepo()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=0.01, repo=repo)
    running.claimed.row["timeout_s"] = 0.01
    try:
        timed_out = await runner._run(spec, running, _Held())  # type: ignore[arg-type]
        handler = running.handler
        assert handler is not None and handler in runner.handbacks
        outlive = asyncio.create_task(runner._outlive(running, timed_out))
        await asyncio.sleep(0.05)
        assert not outlive.done()
        if reason is not None:
            running.stop(reason)
            outcome, held = await outlive
            assert (outcome.state, held) == settled and not handler.done()
    finally:
        stubborn.release.set()
    if reason is None:
        outcome, held = await outlive
        assert (outcome.state, held) == settled and outcome.error == timed_out.error
    repo.handler = handler
    await _leave_abandoned(contextlib.AsyncExitStack(), runner.abandoned, runner.handbacks, 10)
    assert repo.handed_back == ([(1, True)] if held else [])
    assert handler not in runner.handbacks


async def test_a_run_cancelled_before_its_handler_was_stopped_cancels_it() -> None:
    """A delivery claimed after the drain stopped the running attempts reaches the
    drain's last step with its handler never told to stop: it is told then, not left
    to run on until the process exits."""
    started = asyncio.Event()

    async def waits(ctx: TaskContext, args: EmptyArgs) -> None:
        started.set()
        await asyncio.Event().wait()

    runner, running, spec = _attempt(waits, cancel_grace_s=60)
    run = asyncio.create_task(runner._run(spec, running, _Held()))  # type: ignore[arg-type]
    await started.wait()
    handler = running.handler
    assert handler is not None
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    try:
        await asyncio.wait_for(asyncio.gather(handler, return_exceptions=True), 5)
    finally:
        handler.cancel()  # a failed test must not leave it running
    await asyncio.sleep(0)  # the done callbacks
    assert handler.cancelled() and not runner.abandoned


async def test_a_cancelled_run_stops_its_held_back_report() -> None:
    """The drain's last step cancels a run whose handler has a report held back by the
    rate limit: the task that would write it later is stopped and awaited with the run,
    not left to write after the run is over, and later reports are dropped."""
    contexts: list[TaskContext] = []
    reported = asyncio.Event()

    async def reports(ctx: TaskContext, args: EmptyArgs) -> None:
        contexts.append(ctx)
        await ctx.report_progress(0.1)
        await ctx.report_progress(0.2)  # held back: one per second
        reported.set()
        await asyncio.Event().wait()

    runner, running, spec = _attempt(reports, cancel_grace_s=60, progress_max_rate_per_s=1)
    write = FakeWrite()

    async def write_progress(_: TaskMessage, progress: float, text: str | None) -> Any:
        return await write(progress, text)

    runner._write_progress = write_progress  # type: ignore[method-assign]
    flusher = f"progress-{running.claimed.message.task_id}"
    run = asyncio.create_task(runner._run(spec, running, _Held()))  # type: ignore[arg-type]
    await reported.wait()
    assert any(t.get_name() == flusher for t in asyncio.all_tasks())
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    held = [t for t in asyncio.all_tasks() if t.get_name() == flusher]
    try:
        assert held == []
        [ctx] = contexts
        await ctx.report_progress(0.3)
        assert not any(t.get_name() == flusher for t in asyncio.all_tasks())
        assert write.calls == [(0.1, None)]
    finally:
        for task in held:  # a failed test must not leave it running
            task.cancel()


class _Channel:
    """Records the acks and nacks of a consumer's deliveries."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.nacked: list[int] = []

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acked.append(tag)

    async def basic_nack(self, tag: int, requeue: bool = True) -> None:
        assert requeue
        self.nacked.append(tag)


def _delivered(channel: object, tag: int, body: bytes | None = None) -> DeliveredMessage:
    """A delivery as aiormq hands it to a consumer."""
    return DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="ctag", delivery_tag=tag),
        header=ContentHeader(properties=Basic.Properties(headers={"h": tag})),
        body=b"%d" % tag if body is None else body,
        channel=channel,  # type: ignore[arg-type]
    )


class _BlockingRunner:
    """Processes a delivery until told to finish; records what it started."""

    def __init__(self) -> None:
        self.running: dict[Any, Any] = {}
        self.started: list[bytes] = []
        self.finish = asyncio.Event()

    async def process(self, body: bytes, headers: Any) -> None:
        self.started.append(body)
        await self.finish.wait()


async def test_deliveries_wait_for_a_slot_high_first_and_are_handed_back_on_drain() -> None:
    """With every slot taken, later deliveries wait (still in flight), the high lane's
    first; draining hands the waiting ones back at once and lets the running one finish."""
    runner = _BlockingRunner()
    consumer = Consumer(SimpleNamespace(), runner, timeout=1, prefetch=1)  # type: ignore[arg-type]
    normal, high = _Channel(), _Channel()

    def deliver(channel: _Channel, tag: int, is_high: bool) -> None:
        consumer._take(_delivered(channel, tag), high=is_high)

    deliver(normal, 1, False)
    await asyncio.sleep(0)
    deliver(normal, 2, False)
    deliver(high, 3, True)
    await asyncio.sleep(0.01)
    assert runner.started == [b"1"] and consumer.in_flight == 3
    runner.finish.set()
    await asyncio.sleep(0.05)
    # The high delivery came after normal 2, and ran before it.
    assert runner.started == [b"1", b"3", b"2"] and consumer.in_flight == 0
    assert normal.acked == [1, 2] and high.acked == [3]

    runner.finish.clear()
    deliver(normal, 4, False)
    await asyncio.sleep(0)
    deliver(high, 5, True)
    deliver(normal, 6, False)
    await asyncio.sleep(0.01)
    assert consumer.in_flight == 3
    drained = asyncio.create_task(consumer.drain(grace_s=10, handback_s=1))
    await asyncio.sleep(0.05)
    # Handed back at once, never started; the running one is still given its grace.
    assert sorted(normal.nacked + high.nacked) == [5, 6] and consumer.in_flight == 1
    # One that still arrives (a consumer cancel not yet in effect) is left for the
    # channel's close to return: a nack could bring it straight back, again and again.
    deliver(normal, 7, False)
    await asyncio.sleep(0.01)
    assert sorted(normal.nacked + high.nacked) == [5, 6] and b"7" not in runner.started
    runner.finish.set()
    await drained
    assert runner.started[-1] == b"4" and normal.acked[-1] == 4 and consumer.in_flight == 0
    assert 7 not in normal.acked


class _Queue:
    """A queue whose consumer the broker may have dropped (``consumers``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.consumers: dict[str, Any] = {}
        self.consumed: list[str | None] = []
        self.channel = self

    async def get_underlay_channel(self) -> _Queue:
        return self

    async def consume(self, callback: Any, consumer_tag: str | None = None) -> str:
        tag = consumer_tag or f"ctag-{self.name}"
        self.consumers[tag] = callback
        self.consumed.append(consumer_tag)
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        self.consumers.pop(consumer_tag, None)


class _AwayQueue(_Queue):
    """A queue whose robust channel waits for its connection while ``up`` is clear: the
    broker is away."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.up = asyncio.Event()
        self.up.set()

    async def get_underlay_channel(self) -> _Queue:
        await self.up.wait()
        return self


async def test_the_watchdog_turns_on_while_the_broker_is_away() -> None:
    """Each look at a lane is bounded: a watch waiting for the broker's return would be
    taken for hung (shared.liveness) and stop the worker. Meanwhile it counts no miss,
    and so does not consume a second time once the channel is restored."""
    queue = _AwayQueue("normal")
    consumer = Consumer(queue, _BlockingRunner(), timeout=0.05, prefetch=1)  # type: ignore[arg-type]
    await consumer.start()
    queue.up.clear()
    liveness = Liveness()
    stop = asyncio.Event()
    watching = asyncio.create_task(
        consumer.watch(stop, interval_s=0.01), context=liveness.context("watch", within=60)
    )

    def beaten_at() -> float:
        # The report gives the seconds since the beat, in milliseconds.
        return time.monotonic() - float(liveness.report()[1]["loops"]["watch"])

    try:
        await asyncio.sleep(0.2)  # a few bounded looks by now
        first = beaten_at()
        await eventually(until(lambda: beaten_at() > first + 0.02), within=5, what="another turn")
        assert queue.consumed == [None]
        queue.up.set()  # the connection is back, the consumer restored with it
        await asyncio.sleep(0.1)
        assert queue.consumed == [None] and await consumer.consuming()
    finally:
        stop.set()
        queue.up.set()
        await asyncio.wait_for(watching, 5)


async def test_the_watchdog_consumes_again_on_the_lane_whose_consumer_was_dropped() -> None:
    """Both lanes are watched: a high-lane consumer the broker dropped is restored with
    its tag after two misses, and readiness reads not consuming meanwhile."""
    normal, high = _Queue("normal"), _Queue("high")
    consumer = Consumer(
        normal,  # type: ignore[arg-type]
        _BlockingRunner(),  # type: ignore[arg-type]
        timeout=1,
        prefetch=1,
        high_queue=high,  # type: ignore[arg-type]
    )
    await consumer.start()
    assert await consumer.consuming()
    high.consumers.clear()  # cancelled by the broker
    assert not await consumer.consuming()
    await watched_until(
        consumer,
        until(lambda: high.consumed[1:] == ["ctag-high"]),
        within=5,
        what="the high lane consumed again",
    )
    assert normal.consumed == [None] and await consumer.consuming()
    # Consumed again through aio-pika, and taken straight from the channel at once.
    assert high.consumers["ctag-high"] is consumer._lanes[1].direct


class _RecordingRunner:
    """Processes every delivery at once; records what it was given."""

    def __init__(self) -> None:
        self.running: dict[Any, Any] = {}
        self.given: list[tuple[bytes, Any]] = []

    async def process(self, body: bytes, headers: Any) -> None:
        self.given.append((body, dict(headers)))


async def test_deliveries_come_straight_from_the_channel_and_again_after_a_restore() -> None:
    """The lane's consumer on the channel hands deliveries to the worker, not through
    aio-pika's wrapper; after a reconnect restored aio-pika's, the watch puts it back,
    and the restored path delivers meanwhile."""
    queue = _Queue("normal")
    runner = _RecordingRunner()
    consumer = Consumer(queue, runner, timeout=1, prefetch=4)  # type: ignore[arg-type]
    await consumer.start()
    [(tag, direct)] = queue.consumers.items()
    assert direct is not consumer._lanes[0].on_message
    channel = _Channel()
    await direct(_delivered(channel, 1, b"one"))
    await eventually(until(lambda: runner.given == [(b"one", {"h": 1})]), within=5, what="run")

    # A reconnect: aio-pika consumes again with its own callback (an IncomingMessage).
    restored = consumer._lanes[0].on_message
    queue.consumers[tag] = restored
    message = SimpleNamespace(channel=channel, delivery_tag=2, body=b"two", headers={})
    await restored(message)  # type: ignore[arg-type]
    await watched_until(
        consumer, until(lambda: queue.consumers[tag] is direct), within=5, what="direct again"
    )
    assert queue.consumed == [None]  # put back, not consumed again
    await direct(_delivered(channel, 3, b"three"))
    await eventually(until(lambda: channel.acked[-1:] == [3]), within=5, what="all three acked")
    assert [body for body, _ in runner.given] == [b"one", b"two", b"three"]


async def test_the_high_lanes_deliveries_come_straight_to_its_reserved_slots() -> None:
    """Each lane's channel hands its deliveries to that lane: with the one normal slot
    taken, a delivery of the high lane still starts, in the slot reserved for it."""
    normal, high = _Queue("normal"), _Queue("high")
    runner = _BlockingRunner()
    consumer = Consumer(
        normal,  # type: ignore[arg-type]
        runner,  # type: ignore[arg-type]
        timeout=1,
        prefetch=1,
        high_queue=high,  # type: ignore[arg-type]
        reserved=1,
    )
    await consumer.start()
    [to_normal], [to_high] = normal.consumers.values(), high.consumers.values()
    channel = _Channel()
    await to_normal(_delivered(channel, 1))
    await to_normal(_delivered(channel, 2))
    await to_high(_delivered(channel, 3))
    await eventually(until(lambda: runner.started == [b"1", b"3"]), within=5, what="high started")
    assert consumer.in_flight == 3  # normal 2 waits for the normal slot
    runner.finish.set()
    await eventually(until(lambda: runner.started == [b"1", b"3", b"2"]), within=5, what="all")
    await consumer.drain(grace_s=5, handback_s=1)


async def test_a_look_that_ends_after_the_drain_cancelled_the_consumer_consumes_no_more() -> None:
    """A watch's look at a lane that had missed once, still waiting on the channel when
    the drain cancels the consumer, must not consume again: a stopping worker would take
    new deliveries."""
    queue = _AwayQueue("normal")
    consumer = Consumer(queue, _BlockingRunner(), timeout=5, prefetch=1)  # type: ignore[arg-type]
    await consumer.start()
    [lane] = consumer._lanes
    queue.consumers.clear()  # dropped by the broker
    assert not await consumer._watch_lane(lane)  # the first miss
    queue.up.clear()
    look = asyncio.create_task(consumer._watch_lane(lane))
    await asyncio.sleep(0.01)
    await consumer.drain(grace_s=1, handback_s=1)
    queue.up.set()
    await asyncio.wait_for(look, 5)
    assert queue.consumed == [None]
