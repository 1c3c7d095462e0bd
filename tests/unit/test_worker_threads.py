"""Plain ``def`` handlers, with the small fakes of test_worker_units: run in the
worker's pool, reporting from their thread, told to stop through ``ctx.cancelled``, and
never outlived by their run: one that ignores the stop holds its attempt as an async
handler that ignores its cancellation does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.worker.app import _leave_abandoned
from services.worker.consumer import Consumer
from services.worker.progress import MAX_DATA_BYTES
from services.worker.runner import Runner, StopReason, start_handler
from services.worker.sdk import EmptyArgs, PermanentError, SyncTaskContext
from services.worker.threads import HandlerThreads, ThreadRun
from shared.ids import uuid7
from shared.schemas import ProgressEvent, TaskMessage
from tests.support import eventually, until
from tests.unit.test_worker_units import FakeWrite, _abandoned, _attempt, _HandBackRepo
from tests.unit.test_worker_units import _Stubborn as _StubbornAsync

# A thread a failed test left blocked would keep the interpreter from exiting: every
# wait in a handler here has this bound.
SAFETY_S = 30.0


class _Start:
    """Stands in for StartEvent: records the events the reporter emits."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    async def emit(self, events: Sequence[ProgressEvent] = ()) -> None:
        self.events.extend(events)


def _writes(runner: Runner) -> FakeWrite:
    """The runner's progress writes, recorded instead of sent to PostgreSQL."""
    write = FakeWrite()

    async def write_progress(_: TaskMessage, progress: float, text: str | None) -> Any:
        return await write(progress, text)

    runner._write_progress = write_progress  # type: ignore[method-assign]
    return write


class _Stubborn:
    """A def handler that ignores ``ctx.cancelled`` until released; notes its context
    and whether it saw the stop."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.ctx: SyncTaskContext | None = None

    def __call__(self, ctx: SyncTaskContext, args: EmptyArgs) -> str:
        self.ctx = ctx
        self.started.set()
        self.release.wait(SAFETY_S)
        return "done"


async def _started(event: threading.Event) -> None:
    await eventually(until(event.is_set), what="the handler's thread to start")


# ---------------------------------------------------------------- running and reporting


async def test_a_def_handler_runs_in_a_pool_thread_and_reports_from_it() -> None:
    """It runs off the loop's thread, in the pool's; its report reaches the writes and
    the events with its data; its result is the attempt's."""
    threads: list[str] = []

    def handler(ctx: SyncTaskContext, args: EmptyArgs) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        ctx.report_progress(0.5, "half", data={"rows": 3})
        return {"attempt": ctx.attempt, "task": str(ctx.task_id)}

    runner, running, spec = _attempt(handler, cancel_grace_s=1, threaded=True)
    write, start = _writes(runner), _Start()
    outcome = await runner._run(spec, running, start)  # type: ignore[arg-type]
    task_id = running.claimed.message.task_id
    assert (outcome.state, outcome.result) == ("succeeded", {"attempt": 1, "task": str(task_id)})
    [name] = threads
    assert name.startswith("longhaul-handler") and name != threading.current_thread().name
    assert write.calls == [(0.5, "half")]
    assert [(e.progress, e.data) for e in start.events] == [(0.5, {"rows": 3})]


def _raises_permanent(ctx: SyncTaskContext, args: EmptyArgs) -> None:
    raise PermanentError("no such customer", type="no_customer")


def _raises(ctx: SyncTaskContext, args: EmptyArgs) -> None:
    raise ConnectionError("refused")


def _exits(ctx: SyncTaskContext, args: EmptyArgs) -> None:
    raise SystemExit(3)


def _returns_a_set(ctx: SyncTaskContext, args: EmptyArgs) -> set[int]:
    return {1}


async def _coroutine() -> int:
    return 1


def _returns_a_coroutine(ctx: SyncTaskContext, args: EmptyArgs) -> Any:
    return _coroutine()


@pytest.mark.parametrize(
    ("handler", "error_type", "retryable", "says"),
    [
        (_raises_permanent, "no_customer", False, "no such customer"),
        (_raises, "ConnectionError", True, "refused"),
        (_exits, "RuntimeError", True, "SystemExit"),
        (_returns_a_set, "invalid_result", False, "not JSON"),
        (_returns_a_coroutine, "invalid_result", False, "declare it async def"),
    ],
)
async def test_what_a_def_handler_raises_or_returns_ends_its_attempt_as_an_async_ones(
    handler: Any, error_type: str, retryable: bool, says: str
) -> None:
    """PermanentError fails at once, any other exception retries, SystemExit fails the
    attempt (not the worker), a result that is not JSON fails; a coroutine returned by
    a def is never awaited, and says so."""
    runner, running, spec = _attempt(handler, cancel_grace_s=1, threaded=True)
    outcome = await runner._run(spec, running, _Start())  # type: ignore[arg-type]
    assert outcome.state == "failed" and outcome.error is not None
    assert (outcome.error["type"], outcome.retryable) == (error_type, retryable)
    assert says in outcome.error["message"]


async def test_bad_progress_data_raises_in_the_handlers_thread() -> None:
    """What report_progress refuses it raises to the handler, in its thread."""
    refused: list[str] = []

    def handler(ctx: SyncTaskContext, args: EmptyArgs) -> None:
        for data in [{"set": {1, 2}}, {"big": "x" * MAX_DATA_BYTES}]:
            try:
                ctx.report_progress(0.1, data=data)
            except (TypeError, ValueError) as exc:
                refused.append(f"{type(exc).__name__}: {exc}")

    runner, running, spec = _attempt(handler, cancel_grace_s=1, threaded=True)
    write = _writes(runner)
    assert (await runner._run(spec, running, _Start())).state == "succeeded"  # type: ignore[arg-type]
    assert refused == [
        "TypeError: progress data is not JSON: Type is not JSON serializable: set",
        f"ValueError: progress data is over {MAX_DATA_BYTES} bytes as JSON",
    ]
    assert write.calls == []


async def test_the_sync_context_refuses_to_report_from_the_event_loop() -> None:
    """Waiting there for the loop would block it for good: refused, saying why."""
    contexts: list[SyncTaskContext] = []

    def handler(ctx: SyncTaskContext, args: EmptyArgs) -> None:
        contexts.append(ctx)

    runner, running, spec = _attempt(handler, cancel_grace_s=1, threaded=True)
    await runner._run(spec, running, _Start())  # type: ignore[arg-type]
    [ctx] = contexts
    with pytest.raises(RuntimeError, match="handler's own thread"):
        ctx.report_progress(0.5)


# ---------------------------------------------------------------- stopping


async def test_a_def_handler_that_checks_ctx_cancelled_stops_within_its_grace() -> None:
    """The cancel sets ctx.cancelled; the handler returns, and the attempt ends
    cancelled without being given up on."""
    started = threading.Event()
    saw: list[bool] = []

    def handler(ctx: SyncTaskContext, args: EmptyArgs) -> str:
        started.set()
        saw.append(ctx.cancelled.wait(SAFETY_S))
        saw.append(bool(ctx.cancelled))
        return "stopped early"

    runner, running, spec = _attempt(handler, cancel_grace_s=SAFETY_S * 2, threaded=True)
    before = _abandoned()
    run = asyncio.create_task(runner._run(spec, running, _Start()))  # type: ignore[arg-type]
    await _started(started)
    running.stop(StopReason.CANCELLED)
    assert (await run).state == "cancelled"
    assert saw == [True, True]
    handler_task = running.handler
    assert handler_task is not None and handler_task.cancelled()
    assert not runner.abandoned and _abandoned() == before


async def test_a_def_handler_ignoring_ctx_cancelled_is_abandoned_while_its_thread_runs() -> None:
    """Past its grace the run gives up on it, but its task does not end before its
    thread does: counted, and held, until then."""
    stubborn = _Stubborn()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=0.05, threaded=True)
    before = _abandoned()
    run = asyncio.create_task(runner._run(spec, running, _Start()))  # type: ignore[arg-type]
    try:
        await _started(stubborn.started)
        running.stop(StopReason.CANCELLED)
        assert (await run).state == "cancelled"
        [handler] = runner.abandoned
        assert stubborn.ctx is not None and stubborn.ctx.cancelled.is_set()
        await asyncio.sleep(0.05)
        assert before is not None and _abandoned() == before + 1 and not handler.done()
    finally:
        stubborn.release.set()
    with pytest.raises(asyncio.CancelledError):
        await handler  # it stopped, if late: as an async handler letting its cancel through
    await asyncio.sleep(0)  # the done callbacks
    assert not runner.abandoned and _abandoned() == before


def _abandoned_threads() -> float | None:
    return REGISTRY.get_sample_value("longhaul_worker_abandoned_handler_threads")


@pytest.mark.parametrize("threaded", [True, False])
async def test_an_abandoned_def_handlers_pool_thread_is_counted_until_it_returns(
    threaded: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Given up on, a def handler keeps its pool thread (def tasks beyond the free ones
    wait for one, their timeout running): counted by a gauge of its own, and said in the
    abandon's warning, until it returns. An async handler holds no thread."""
    stubborn: Any = _Stubborn() if threaded else _StubbornAsync()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=0.01, threaded=threaded)
    abandoned, threads = _abandoned(), _abandoned_threads()
    assert abandoned is not None and threads is not None
    run = asyncio.create_task(runner._run(spec, running, _Start()))  # type: ignore[arg-type]
    try:
        if threaded:
            await _started(stubborn.started)
        else:
            await stubborn.started.wait()
        with caplog.at_level(logging.WARNING, logger="services.worker.runner"):
            running.stop(StopReason.CANCELLED)
            assert (await run).state == "cancelled"
        [handler] = runner.abandoned
        assert (_abandoned(), _abandoned_threads()) == (abandoned + 1, threads + threaded)
        [line] = [r for r in caplog.records if "abandoning it" in r.getMessage()]
        assert line.levelno == logging.WARNING and "ignored cancellation" in line.getMessage()
        assert ("pool thread stays taken" in line.getMessage()) is threaded
        assert line.abandoned_threads == (1 if threaded else 0)  # type: ignore[attr-defined]
    finally:
        stubborn.release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await handler
    await asyncio.sleep(0)  # the done callbacks
    assert (_abandoned(), _abandoned_threads()) == (abandoned, threads)


@pytest.mark.parametrize("reason", [StopReason.LAPSED, StopReason.FENCED])
@pytest.mark.parametrize("threaded", [True, False])
async def test_a_def_handler_that_outlives_a_lost_lease_ends_the_worker(
    reason: StopReason, threaded: bool
) -> None:
    """Its attempt is another worker's to run now (fenced) or soon (lapsed), and a
    thread cannot be stopped: past its grace the worker exits at once. An async handler
    ignoring its cancellation is frozen at its next await instead: no exit for it."""
    stubborn: Any = _Stubborn() if threaded else _stubborn_async()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=0.05, threaded=threaded)
    exits: list[str] = []
    runner._exit_now = exits.append
    run = asyncio.create_task(runner._run(spec, running, _Start()))  # type: ignore[arg-type]
    try:
        if threaded:
            await _started(stubborn.started)
        else:
            await asyncio.sleep(0.01)
        running.stop(reason)
        await run
        assert len(exits) == (1 if threaded else 0)
        if threaded:
            assert reason.value in exits[0] and str(running.claimed.message.task_id) in exits[0]
    finally:
        if threaded:
            stubborn.release.set()
    handler = running.handler
    assert handler is not None
    if not threaded:
        handler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handler


def _stubborn_async() -> Any:
    async def handler(ctx: Any, args: EmptyArgs) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(SAFETY_S)
        await asyncio.sleep(SAFETY_S)

    return handler


@pytest.mark.parametrize(
    ("reason", "settled"),
    [
        (None, ("failed", False)),
        (StopReason.CANCELLED, ("cancelled", False)),
        (StopReason.SHUTDOWN, ("interrupted", True)),
    ],
)
async def test_a_timed_out_def_handler_holds_its_attempt_until_its_thread_ended(
    reason: StopReason | None, settled: tuple[str, bool]
) -> None:
    """As an async handler's: the timeout sets ctx.cancelled; ignored past the grace,
    its run settles the attempt only once the thread ended (no retry beside it), or at
    a stop: a cancel at once, a stopping worker by its last wait's hand-back."""
    stubborn, repo = _Stubborn(), _HandBackRepo()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=0.01, repo=repo, threaded=True)
    running.claimed.row["timeout_s"] = 0.05  # type: ignore[index]
    try:
        timed_out = await runner._run(spec, running, _Start())  # type: ignore[arg-type]
        handler = running.handler
        assert handler is not None and handler in runner.handbacks
        assert timed_out.error is not None and timed_out.error["type"] == "timeout"
        assert stubborn.ctx is not None and stubborn.ctx.cancelled.is_set()
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
        assert (outcome.state, held) == settled and handler.done()
    repo.handler = handler
    await _leave_abandoned(contextlib.AsyncExitStack(), runner.abandoned, runner.handbacks, 10)
    assert repo.handed_back == ([(1, True)] if held else [])


async def test_a_stopping_worker_hands_a_stubborn_def_handlers_attempt_back_once_it_ended() -> None:
    """The drain gives up on it (told to stop, its thread runs on); the shutdown's last
    wait hands its attempt back only once the thread ended."""
    stubborn, repo = _Stubborn(), _HandBackRepo()
    runner, running, spec = _attempt(stubborn, cancel_grace_s=60, repo=repo, threaded=True)
    runner.running[running.claimed.message.task_id] = running
    consumer = Consumer(SimpleNamespace(), runner, timeout=1, prefetch=1)  # type: ignore[arg-type]
    delivery = asyncio.create_task(runner._run(spec, running, _Start()))  # type: ignore[arg-type]
    consumer._tasks.add(delivery)  # type: ignore[arg-type]
    try:
        await _started(stubborn.started)
        await consumer.drain(grace_s=0, handback_s=0.05)
        assert running.stop_reason is StopReason.SHUTDOWN
        assert stubborn.ctx is not None and stubborn.ctx.cancelled.is_set()
        [handler] = runner.abandoned
        repo.handler = handler
        last_wait = asyncio.create_task(
            _leave_abandoned(contextlib.AsyncExitStack(), runner.abandoned, runner.handbacks, 60)
        )
        await asyncio.sleep(0.05)
        assert not last_wait.done() and not handler.done() and not repo.handed_back
    finally:
        stubborn.release.set()
    await asyncio.wait_for(last_wait, 10)
    assert repo.handed_back == [(1, True)]


@pytest.mark.parametrize("told", [False, True])
@pytest.mark.parametrize("reason", [StopReason.SHUTDOWN, StopReason.CANCELLED])
async def test_a_stop_after_the_thread_returned_does_not_reach_it(
    reason: StopReason, told: bool
) -> None:
    """The thread returned, and before the loop saw it a stop came: as for an async
    handler done in the same turn, its success stands (not run again by a hand-back,
    nor called cancelled). One told to stop before it returned is stopped."""
    go = threading.Event()
    started = threading.Event()
    contexts: list[SyncTaskContext] = []

    def handler(ctx: SyncTaskContext, args: EmptyArgs) -> str:
        contexts.append(ctx)
        started.set()
        go.wait(SAFETY_S)
        return "done"

    runner, running, spec = _attempt(handler, cancel_grace_s=SAFETY_S, threaded=True)
    runner._threads = HandlerThreads(1)  # its one thread runs the jobs in order
    run = asyncio.create_task(runner._run(spec, running, _Start()))  # type: ignore[arg-type]
    await _started(started)
    if told:
        running.stop(reason)
        await eventually(until(contexts[0].cancelled.is_set), what="ctx.cancelled")
        go.set()
    else:
        # The loop blocked from here to the stop: the thread returns meanwhile, and a
        # job queued behind it on the pool's one thread runs once it has.
        go.set()
        runner._threads._pool.submit(lambda: None).result(SAFETY_S)
        running.stop(reason)
    outcome = await run
    if told:
        assert outcome.state == ("cancelled" if reason is StopReason.CANCELLED else "interrupted")
    else:
        assert (outcome.state, outcome.result) == ("succeeded", "done")


class _Clocked(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it: a timer (the run's
    deadline) fires in the turn the test chooses, never before."""

    now = 0.0

    def time(self) -> float:
        return self.now


class _Shown(_Start):
    """A _Start that tells when the run showed the attempt started: from then on it waits
    for the handler, its stop or its deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = asyncio.Event()

    async def emit(self, events: Sequence[ProgressEvent] = ()) -> None:
        await super().emit(events)
        self.shown.set()


@pytest.mark.parametrize(
    ("threaded", "told", "fails"),
    # The async case held before the def handlers' fix too: it guards the rule they share.
    [(True, False, False), (True, False, True), (True, True, False), (False, False, False)],
)
def test_a_handler_that_ended_as_its_deadline_fired_did_not_time_out(
    threaded: bool, told: bool, fails: bool
) -> None:
    """The deadline's timer and the handler's end reach the loop in the same turn: a
    def handler's thread returned, its result one turn behind the timer on its way to
    the loop, or an async handler's await resolved. Its result stands, as it would have
    a turn earlier (a timeout would run it again), and so does what it raised. A def
    handler still running when the deadline fired is told to stop, and timed out
    whatever it returns after."""
    go = threading.Event()
    timeout_s = 10.0

    def blocks(ctx: SyncTaskContext, args: EmptyArgs) -> str:
        (ctx.cancelled if told else go).wait(SAFETY_S)
        if fails:
            raise PermanentError("no such customer", type="no_customer")
        return "done"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, _Clocked)
        gate: asyncio.Future[None] = loop.create_future()

        async def awaits(ctx: Any, args: EmptyArgs) -> str:
            await gate
            return "done"

        runner, running, spec = _attempt(
            blocks if threaded else awaits, cancel_grace_s=SAFETY_S, threaded=threaded
        )
        running.claimed.row["timeout_s"] = timeout_s  # type: ignore[index]
        runner._threads = pool = HandlerThreads(1)  # its one thread runs the jobs in order
        start = _Shown()
        try:
            run = asyncio.create_task(runner._run(spec, running, start))  # type: ignore[arg-type]
            await start.shown.wait()  # its deadline's timer is set
            if not threaded:
                gate.set_result(None)  # the handler's step is now on the loop, due first
            elif not told:
                # The thread returns, and a job queued behind it on the pool's one
                # thread runs once its result was handed to the loop (not yet run).
                go.set()
                pool._pool.submit(lambda: None).result(SAFETY_S)
            loop.now += timeout_s  # due in the loop's next turn, beside the result
            outcome = await run
        finally:
            go.set()
            pool.shutdown()
        if told:
            assert outcome.error is not None and outcome.error["type"] == "timeout"
        elif fails:
            assert outcome.error is not None and outcome.error["type"] == "no_customer"
            assert not outcome.retryable
        else:
            assert (outcome.state, outcome.result, outcome.error) == ("succeeded", "done", None)

    with asyncio.Runner(loop_factory=_Clocked) as clocked:
        clocked.run(main())


# ---------------------------------------------------------------- the pool and the bridge


async def _report_nothing(progress: float, message: str | None, data: Any) -> None:
    pass


def _context(run: ThreadRun) -> SyncTaskContext:
    return SyncTaskContext(
        task_id=uuid7(),
        type="t.x",
        tenant_id=uuid7(),
        attempt=1,
        max_attempts=1,
        deadline=datetime.now(UTC),
        cancelled=run.cancelled,
        _progress=run.report_progress,
    )


async def test_the_pool_has_a_thread_for_every_run_slot() -> None:
    """As many def handlers as slots run at once: each waits for all the others."""
    slots = 4
    threads = HandlerThreads(slots)
    barrier = threading.Barrier(slots, timeout=SAFETY_S)

    def meet(ctx: SyncTaskContext, args: None) -> int:
        return barrier.wait()

    try:
        runs = [threads.attempt(_report_nothing) for _ in range(slots)]
        arrived = await asyncio.gather(*(run(meet, _context(run), None) for run in runs))
        assert sorted(arrived) == list(range(slots))
    finally:
        threads.shutdown()


async def test_a_handler_still_waiting_for_a_thread_ends_at_once_on_a_stop() -> None:
    """With every thread taken (by handlers given up on), a queued one told to stop
    never starts, and its task ends at once."""
    threads = HandlerThreads(1)
    release = threading.Event()
    ran: list[str] = []

    def blocks(ctx: SyncTaskContext, args: None) -> None:
        ran.append("blocks")
        release.wait(SAFETY_S)

    def queued(ctx: SyncTaskContext, args: None) -> None:
        ran.append("queued")

    try:
        first_run = threads.attempt(_report_nothing)
        first = start_handler(first_run(blocks, _context(first_run), None), name="first")
        await eventually(until(lambda: ran == ["blocks"]))
        second_run = threads.attempt(_report_nothing)
        second = start_handler(second_run(queued, _context(second_run), None), name="second")
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert second_run.cancelled.is_set() and not first.done()
    finally:
        release.set()
    await first
    threads.shutdown()
    assert ran == ["blocks"]


def _waiting_for_thread() -> float | None:
    return REGISTRY.get_sample_value("longhaul_worker_waiting_for_thread")


@pytest.mark.parametrize("stopped", [False, True])
async def test_a_def_handler_waiting_for_a_thread_is_counted_until_it_gets_one(
    stopped: bool,
) -> None:
    """With every thread taken, a def handler queued for one is counted (its timeout
    runs meanwhile) until a thread starts it, or a stop ends it before that."""
    threads = HandlerThreads(1)
    release, started = threading.Event(), threading.Event()
    before = _waiting_for_thread()
    assert before is not None

    def blocks(ctx: SyncTaskContext, args: None) -> None:
        started.set()
        release.wait(SAFETY_S)

    def queued(ctx: SyncTaskContext, args: None) -> str:
        return "ran"

    try:
        first_run = threads.attempt(_report_nothing)
        first = start_handler(first_run(blocks, _context(first_run), None), name="first")
        await _started(started)
        assert _waiting_for_thread() == before
        second_run = threads.attempt(_report_nothing)
        second = start_handler(second_run(queued, _context(second_run), None), name="second")
        await asyncio.sleep(0)  # its first step (run at once from Python 3.12 only)
        assert _waiting_for_thread() == before + 1
        if stopped:
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
        else:
            release.set()
            assert await second == "ran"
        assert _waiting_for_thread() == before
    finally:
        release.set()
    await first
    threads.shutdown()


async def test_a_stop_cuts_the_report_the_thread_waits_for() -> None:
    """A report stuck on the loop (PostgreSQL away: its write retries) would keep the
    thread from seeing the stop: the stop cuts it, as an async handler's cancellation
    cuts its own, and drops later ones; the report's task is ended before the run is."""
    threads = HandlerThreads(1)
    reporting = asyncio.Event()
    seen: list[bool] = []

    unwound: list[bool] = []

    async def stuck(progress: float, message: str | None, data: Any) -> None:
        reporting.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # a cut write takes a moment to unwind
            unwound.append(True)

    def reports(ctx: SyncTaskContext, args: None) -> None:
        ctx.report_progress(0.5)
        seen.append(ctx.cancelled.is_set())
        ctx.report_progress(0.6)  # dropped: the stop decided the outcome

    run = threads.attempt(stuck)
    task = start_handler(run(reports, _context(run), None), name="reports")
    await reporting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, SAFETY_S)
    threads.shutdown()
    assert seen == [True]
    assert unwound == [True]


async def test_shutdown_does_not_wait_for_a_running_thread() -> None:
    """A thread still running at shutdown is an abandoned handler's, which the exit
    ends: shutting the pool down must not block the loop on it."""
    threads = HandlerThreads(1)
    release = threading.Event()

    def blocks(ctx: SyncTaskContext, args: None) -> None:
        release.wait(SAFETY_S)

    run = threads.attempt(_report_nothing)
    task = start_handler(run(blocks, _context(run), None), name="blocks")
    try:
        threads.shutdown()
        assert not task.done()
    finally:
        release.set()
    await task
