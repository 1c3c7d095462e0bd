"""Runs one delivered task message to its outcome; the caller acks when it returns.

The order of every run: claim the attempt (conditional UPDATE), run the handler under
its timeout, commit the outcome (conditional UPDATE), then write the event, then ack.
A message that can never be processed is kept as a dead letter before it is acked."""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import orjson
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ValidationError

from services.worker.handback import HandBacks
from services.worker.outcomes import Counted, Outcome
from services.worker.progress import ProgressReporter, StartEvent
from services.worker.registry import Registry
from services.worker.repository import Claimed, Letter, WorkerRepository
from services.worker.sdk import SyncTaskContext, TaskContext, TaskFailure, TaskSpec
from services.worker.settings import WorkerSettings
from services.worker.threads import HandlerThreads
from shared import lifecycle
from shared.backoff import Backoff
from shared.db import TRANSIENT_ERRORS
from shared.errors import MessageError
from shared.events import EventSink
from shared.failpoints import Failpoints
from shared.jsonsafe import nul_path
from shared.logging import task_id_var, trace_id_var
from shared.schemas import ProgressEvent, TaskMessage, TaskState, parse_task_message
from shared.taskrows import Row, event_from_row, previous_events

log = logging.getLogger(__name__)
T = TypeVar("T")

PASSED_ON = Counter(
    "longhaul_worker_passed_on_total",
    "Messages of a type this worker lacks, published again for a worker that runs it",
)
ABANDONED = Gauge(
    "longhaul_worker_abandoned_handlers",
    "Handlers given up on (past their cancel grace, or their run ended first) that still"
    " run in this process",
)
ABANDONED_THREADS = Gauge(
    "longhaul_worker_abandoned_handler_threads",
    "Threads of the def handlers' pool (one per run slot) held by abandoned def handlers"
    " until they return: def tasks beyond the free threads wait for one, their timeout"
    " running",
)
# A message of a type this worker lacks goes back to the queue this much later: the
# broker may give it to this worker again, and each turn costs a transaction.
PASS_ON_DELAY_S = 1.0


class StopReason(enum.Enum):
    CANCELLED = "cancelled"  # the user asked (POST /cancel)
    SHUTDOWN = "shutdown"  # this worker is stopping and the grace period ran out
    FENCED = "fenced"  # the attempt is no longer ours (reaped)
    LAPSED = "lease lapsed"  # unrenewed for a lease: another worker may run it by now


@dataclass
class Running:
    """An attempt in progress, for the heartbeat and for cancellation."""

    claimed: Claimed
    handler: asyncio.Task[Any] | None = None
    stop_reason: StopReason | None = None
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Monotonic time the lease is known to run a whole lease from: when the claim, or
    # the latest renewal that extended it, was sent (the database's now() is later).
    lease_since: float = field(default_factory=time.monotonic)
    # Done once stop() is called: the run waits on it beside the handler, so that a
    # handler ignoring its cancellation is given up after the grace period, not at
    # its timeout. Made only for a handler that did not end at once.
    stopped: asyncio.Future[None] | None = None

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.handler is not None and not self.handler.done():
            self.handler.cancel()
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(None)


class Runner:
    def __init__(
        self,
        settings: WorkerSettings,
        repo: WorkerRepository,
        events: EventSink,
        registry: Registry,
        failpoints: Failpoints,
        worker_id: str,
        threads: HandlerThreads,
        exit_now: Callable[[str], None] | None = None,
    ) -> None:
        """``exit_now`` ends the process at once (tests give a fake): see _abandon. A
        thread cannot be stopped any other way; what the worker held is requeued by the
        reapers once its leases run out, as after a crash."""
        self._settings = settings
        self._exit_now = exit_now or lifecycle.exit_now
        self._repo = repo
        self._events = events
        self._registry = registry
        self._failpoints = failpoints
        self._worker_id = worker_id
        self._threads = threads
        self._backoff = Backoff(settings.retry_base_s, settings.retry_factor, settings.retry_cap_s)
        self.running: dict[UUID, Running] = {}
        # Handlers still running past their cancel grace, or when their run ended first
        # (cancelled by a stopping worker's drain, say): kept so shutdown can wait for
        # them a last time, never awaited on the hot path.
        self.abandoned: set[asyncio.Task[Any]] = set()
        # The abandoned def handlers among them: each holds a pool thread until it returns.
        self._abandoned_threads: set[asyncio.Task[Any]] = set()
        # The attempts of abandoned handlers, held until they end: by their run (timed
        # out), or for the hand-back of a stopping worker.
        self.handbacks = HandBacks(repo, _interrupted(StopReason.SHUTDOWN))
        self._counted = Counted()

    async def process(self, body: bytes, headers: Mapping[str, Any]) -> None:
        try:
            message = parse_task_message(body)
        except MessageError as exc:
            await self._dead_letter(exc.reason, str(exc), body, headers)
            return
        task_id_var.set(str(message.task_id))
        trace_id_var.set(message.trace_id)
        await self._failpoints.hit("worker.before_claim")
        spec = self._registry.get(message.type)
        if spec is None:
            await self._unknown_type(message, body, headers)
            return
        claimed, claim_sent = await self._db(lambda: self._claim(message))
        if claimed is None:
            # Delivered twice, stale (a newer attempt exists) or cancelled meanwhile;
            # or a message for no task of ours at all, which is kept as a dead letter.
            await self._skip(message, body, headers)
            return
        start = StartEvent(
            self._events, event_from_row(claimed.row), previous_events([claimed.row])
        )
        log.debug("attempt started", extra={"type": message.type, "attempt": message.attempt})
        running = Running(claimed, lease_since=claim_sent)
        self.running[message.task_id] = running
        self._counted.claimed(spec.name, claimed.row["queued_s"])
        try:
            outcome = await self._run(spec, running, start)
            # Its handler ignored its cancellation: the attempt is settled when it ends.
            held = running.handler in self.handbacks
            if held:
                outcome, held = await self._outlive(running, outcome)
            ending = outcome.ending(message.attempt, int(claimed.row["max_attempts"]))
            if outcome.state != "succeeded":
                # Once a retry or a hand-back is committed, another process may write the
                # task's next events (the relay's promotion, another claim), and Redis
                # refuses a seq below the stream's last: the held ones go first.
                await start.emit()
            await self._failpoints.hit("worker.before_commit")
            # A hand-back held for its handler is committed by the stopping worker.
            row = None if held else await self._commit(spec, claimed, outcome, ending)
            await self._failpoints.hit("worker.after_commit")
            # A held hand-back is committed later; any other outcome refused was fenced.
            self._counted.ended(
                spec.name,
                ending if held or row is not None else "fenced",
                time.monotonic() - claim_sent,
            )
        finally:
            # The next attempt may already run here (its retry was due at once). A held
            # attempt stays: the heartbeat renews its lease while the worker stops (or
            # while this run waits for its handler, see _outlive).
            mine = self.running.get(message.task_id) is running
            if mine and running.handler not in self.handbacks:
                del self.running[message.task_id]
        # The start event goes even when the outcome was fenced out: its seq is taken.
        await start.emit([event_from_row(row)] if row is not None else [])
        log.debug("attempt ended", extra={"outcome": outcome.state, "committed": row is not None})

    async def _run(self, spec: TaskSpec, running: Running, start: StartEvent) -> Outcome:
        claimed = running.claimed
        message, row = claimed.message, claimed.row
        timeout_s = float(row["timeout_s"])
        reporter = ProgressReporter(
            lambda p, m: self._write_progress(message, p, m),
            start,
            max_rate=self._settings.progress_max_rate_per_s,
            name=str(message.task_id),
            # The attempt is no longer ours (reaped): its handler must not run on
            # beside the next attempt.
            on_fenced=lambda: running.stop(StopReason.FENCED),
        )
        try:
            args = spec.args_model.model_validate(claimed.args)
        except ValidationError as exc:
            return _failed("invalid_args", _first_error(exc), retryable=False)
        if row["cancel_requested_at"] is not None:
            # Asked before the attempt began: the handler never starts.
            running.stop(StopReason.CANCELLED)
            return Outcome("cancelled")
        call = self._invocation(spec, claimed, timeout_s, reporter, args)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            handler = start_handler(_call(call), name=f"handler-{message.task_id}")
            running.handler = handler
            timed_out = False
            try:
                if handler.done():
                    # Done at its first step; one that blocked the loop past its timeout
                    # still ran past it.
                    timed_out = loop.time() > deadline
                else:
                    stopped = running.stopped = loop.create_future()
                    if running.stop_reason is not None:
                        stopped.set_result(None)
                    waiting = {handler, stopped}
                    await asyncio.wait(
                        waiting,
                        timeout=min(self._settings.start_event_delay_s, timeout_s),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not handler.done() and not stopped.done():
                        await start.emit()  # still running: show it now
                        remaining = deadline - loop.time()
                        await asyncio.wait(
                            waiting,
                            timeout=max(0.0, remaining),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    timed_out = not handler.done() and not stopped.done()
                cut = timed_out and not handler.done()
                if cut:
                    handler.cancel()
                if not handler.done():
                    await asyncio.wait({handler}, timeout=self._settings.cancel_grace_s)
                if cut and _ended_unstopped(handler):
                    # A def handler's thread returned before the deadline's cancel reached
                    # it, its result still on its way to the loop (a turn behind the
                    # timer): it never saw the stop, and its end stands as a turn earlier.
                    timed_out = False
            finally:
                # Past its grace, or this run itself was cancelled (the last step of a
                # stopping worker's drain): either way nobody waits for the handler now.
                if not handler.done():
                    self._abandon(handler, running)
            outcome = self._outcome(handler, running.stop_reason, timed_out, timeout_s)
            # Whatever the outcome: a report held back and written after the outcome's
            # event would take a seq below it, which the stream refuses (a gap).
            await reporter.close()
        finally:
            # Also when the run is cancelled (the drain's last step) before close():
            # its held-back report is then dropped, not written later by a task
            # nobody awaits; and an abandoned handler's later reports are dropped.
            await reporter.abort()
        return outcome

    def _invocation(
        self,
        spec: TaskSpec,
        claimed: Claimed,
        timeout_s: float,
        reporter: ProgressReporter,
        args: BaseModel,
    ) -> Callable[[], Awaitable[Any]]:
        """The handler's call with its context: an async def's own coroutine, or a plain
        def's run in a thread of the worker's pool."""
        message, row = claimed.message, claimed.row
        deadline = datetime.now(UTC) + timedelta(seconds=timeout_s)
        if spec.threaded:
            thread = self._threads.attempt(reporter.report)
            sync_ctx = SyncTaskContext(
                task_id=message.task_id,
                type=message.type,
                tenant_id=message.tenant_id,
                attempt=message.attempt,
                max_attempts=int(row["max_attempts"]),
                deadline=deadline,
                cancelled=thread.cancelled,
                _progress=thread.report_progress,
            )
            return lambda: thread(spec.handler, sync_ctx, args)
        ctx = TaskContext(
            task_id=message.task_id,
            type=message.type,
            tenant_id=message.tenant_id,
            attempt=message.attempt,
            max_attempts=int(row["max_attempts"]),
            deadline=deadline,
            _progress=reporter.report,
        )
        return lambda: spec.handler(ctx, args)

    async def _outlive(self, running: Running, outcome: Outcome) -> tuple[Outcome, bool]:
        """The outcome to commit for an attempt whose handler ignored its cancellation,
        and whether it is held for the stopping worker instead. A timed-out attempt is
        kept (running, its lease renewed, its run slot taken) until the handler ended:
        its retry let the next attempt run beside it. A stop ends the wait: a cancel
        needs no next attempt, a fenced or lapsed attempt is no longer ours to hold, and
        a stopping worker hands it back once the handler ended or as it exits."""
        handler, stopped = running.handler, running.stopped
        assert handler is not None  # held: it outlived its grace
        if not self.handbacks.by_run(handler):
            return outcome, True
        assert stopped is not None  # made for every handler not done at once
        try:
            await asyncio.wait({handler, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the drain's last step
            self.handbacks.hand_back(handler)
            raise
        if running.stop_reason is StopReason.SHUTDOWN and not handler.done():
            self.handbacks.hand_back(handler)
            return Outcome("interrupted", error=_interrupted(StopReason.SHUTDOWN)), True
        self.handbacks.settled(handler)
        if running.stop_reason is StopReason.CANCELLED:
            return Outcome("cancelled"), False
        return outcome, False

    def _abandon(self, handler: asyncio.Task[Any], running: Running) -> None:
        why = "handler ignored cancellation; abandoning it"
        # Never told to stop: claimed after the drain stopped the running.
        unstopped = not handler.cancelling()
        if unstopped:
            handler.cancel()
            why = "run ended before its handler did; cancelled and abandoning it"
        # Given up on, it still takes this process's CPU and memory: counted until it
        # ends, and shutdown waits for it a last time.
        message = running.claimed.message
        threaded = self._threaded(message.type)
        self.abandoned.add(handler)
        ABANDONED.inc()
        if threaded:
            self._abandoned_threads.add(handler)
            ABANDONED_THREADS.inc()
            why += "; its pool thread stays taken until it returns"
        handler.add_done_callback(self._abandoned_ended)
        log.warning(
            why,
            extra={
                "abandoned": len(self.abandoned),
                "abandoned_threads": len(self._abandoned_threads),
            },
        )
        if unstopped or running.stop_reason is StopReason.SHUTDOWN:
            self.handbacks.hold(handler, message)
        elif running.stop_reason is None:  # timed out: a next attempt may follow
            self.handbacks.hold(handler, message, by_run=True)
        elif running.stop_reason in (StopReason.FENCED, StopReason.LAPSED) and threaded:
            # Not ours any more, or soon not: another worker may run the next attempt now.
            # An async handler that ignores its cancellation is frozen at its next await
            # until the loop runs it; a thread runs on. Only the process's end stops it.
            # The attempt is left to the reaper (its lease runs out), as after a crash.
            self._exit_now(
                f"the def handler of task {message.task_id} ({running.stop_reason.value}) did"
                " not stop within LONGHAUL_CANCEL_GRACE_S: exiting, lest it run beside the"
                " next attempt"
            )

    def _threaded(self, type_name: str) -> bool:
        spec = self._registry.get(type_name)
        return spec is not None and spec.threaded

    def _abandoned_ended(self, handler: asyncio.Task[Any]) -> None:
        self.abandoned.discard(handler)
        ABANDONED.dec()
        if handler in self._abandoned_threads:
            self._abandoned_threads.discard(handler)
            ABANDONED_THREADS.dec()
        # Its attempt is settled without it (a timeout's as it ends): what it raised is
        # only told.
        error = None if handler.cancelled() else handler.exception()
        log.info(
            "an abandoned handler ended",
            extra={"abandoned": len(self.abandoned), "error": repr(error)[:300] if error else None},
        )

    def _outcome(
        self,
        handler: asyncio.Task[Any],
        reason: StopReason | None,
        timed_out: bool,
        timeout_s: float,
    ) -> Outcome:
        if (
            reason in (StopReason.SHUTDOWN, StopReason.CANCELLED)
            and _ended_unstopped(handler)
            and handler.exception() is None
        ):
            # It succeeded in the same turn as the stop came: its effects are done, and
            # running it again (a shutdown's hand-back) or calling it cancelled would lie.
            reason = None
        if reason is not None and handler.done() and not handler.cancelled():
            handler.exception()  # retrieved: the stop decides, the handler's error is moot
        if reason is StopReason.CANCELLED:
            return Outcome("cancelled")
        if reason in (StopReason.SHUTDOWN, StopReason.FENCED, StopReason.LAPSED):
            return Outcome("interrupted", error=_interrupted(reason))
        if timed_out:
            return _failed(
                "timeout",
                f"the attempt ran past its timeout of {timeout_s:g}s",
                retryable=self._settings.retry_on_timeout,
            )
        if not handler.done() or handler.cancelled():
            return _failed("cancelled", "the handler was cancelled", retryable=True)
        exc = handler.exception()
        if exc is None:
            result = handler.result()
            try:
                if isinstance(result, BaseModel):
                    result = result.model_dump(mode="json")
                encoded = orjson.dumps(result)
            except (TypeError, ValueError) as err:  # pydantic's serialization error too
                return _failed("invalid_result", f"result is not JSON: {err}", retryable=False)
            result = orjson.loads(encoded)
            if b"\\u0000" in encoded and (where := nul_path(result, ["result"])) is not None:
                where_ = ".".join(map(str, where))
                return _failed("invalid_result", f"{where_} has a NUL character", retryable=False)
            return Outcome("succeeded", result=result)
        if isinstance(exc, TaskFailure):
            return _failed(exc.type, str(exc), retryable=exc.retryable)
        log.warning("handler raised", exc_info=exc)
        return _failed(type(exc).__name__, str(exc) or type(exc).__name__, retryable=True)

    async def _claim(self, message: TaskMessage) -> tuple[Claimed | None, float]:
        """The claim, and when it was sent: its lease runs from then at the earliest."""
        sent = time.monotonic()
        return await self._repo.claim(message, self._worker_id, self._settings.lease_s), sent

    async def _commit(
        self, spec: TaskSpec, claimed: Claimed, outcome: Outcome, ending: str
    ) -> Row | None:
        message = claimed.message
        tid, attempt = message.task_id, message.attempt
        if ending == "succeeded":
            return await self._db(lambda: self._repo.succeed(tid, attempt, outcome.result))
        if ending == "cancelled":
            return await self._db(lambda: self._repo.finish(tid, attempt, "cancelled", None))
        error = outcome.error or {}
        if ending == "interrupted":
            rows = await self._db(lambda: self._repo.hand_back([message], error))
            return rows[0] if rows else None
        if ending == "retrying":
            backoff = _backoff_of(claimed.row) or spec.backoff or self._backoff
            delay = backoff.delay(attempt)
            return await self._db(lambda: self._repo.retry_later(message, error, delay))
        if ending == "exhausted":  # its attempts ran out: also a dead letter, to redrive
            return await self._db(lambda: self._repo.exhaust(message, error))
        return await self._db(lambda: self._repo.finish(tid, attempt, "failed", error))

    async def _write_progress(
        self, message: TaskMessage, progress: float, text: str | None
    ) -> ProgressEvent | None:
        row = await self._db(
            lambda: self._repo.progress(message.task_id, message.attempt, progress, text)
        )
        return event_from_row(row) if row else None

    async def _unknown_type(
        self, message: TaskMessage, body: bytes, headers: Mapping[str, Any]
    ) -> None:
        """No handler here. While another worker runs the type (it said so within a
        lease: a rolling deploy that adds a type), pass the message on to it. Otherwise
        fail the task (it must end) and keep the message to redrive."""
        if await self._db(
            lambda: self._repo.pass_on(message, self._settings.lease_s, PASS_ON_DELAY_S)
        ):
            PASSED_ON.inc()
            log.info("passed on: another worker runs this type", extra={"type": message.type})
            return
        claimed = await self._db(
            lambda: self._repo.claim(message, self._worker_id, self._settings.lease_s)
        )
        if claimed is not None:
            detail = f"no worker here runs tasks of type {message.type!r}"
            error = {"type": "unknown_type", "retryable": False, "message": detail}
            # With the queued event before it, as every claim writes it (see process).
            await self._events.emit(
                [event_from_row(claimed.row)], backfill=previous_events([claimed.row])
            )
            log.warning(
                "dead-lettering message", extra={"reason": "unknown_type", "detail": detail}
            )
            letter = Letter("unknown_type", detail, body, _jsonable(headers))
            row = await self._db(lambda: self._repo.fail_and_keep(message, error, letter))
            if row is not None:
                await self._events.emit([event_from_row(row)])
        else:
            await self._skip(message, body, headers)

    async def _skip(self, message: TaskMessage, body: bytes, headers: Mapping[str, Any]) -> None:
        row = await self._db(lambda: self._repo.event_row(message.task_id, message.tenant_id))
        if row is None:
            await self._dead_letter(
                "unknown_task", "no task with this id and tenant", body, headers, message
            )
        elif TaskState(row["state"]).terminal:
            # A worker killed between its commit and its event write left the terminal
            # event unwritten, and the redelivery that brings it here is the moment to
            # tell live clients: at once, not at the gateway's next sweep. Published
            # only: the worker that ran it may be alive and still writing the events
            # before it (this is a duplicate message), and clients drop what they have.
            await self._events.announce(event_from_row(row))

    async def _dead_letter(
        self,
        reason: str,
        detail: str,
        body: bytes,
        headers: Mapping[str, Any],
        message: TaskMessage | None = None,
    ) -> None:
        log.warning("dead-lettering message", extra={"reason": reason, "detail": detail[:300]})
        letter = Letter(reason, detail, body, _jsonable(headers))
        await self._db(
            lambda: self._repo.dead_letter(
                letter,
                tenant_id=message.tenant_id if message else None,
                task_id=message.task_id if message else None,
            )
        )

    async def _db(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op``, retrying while PostgreSQL is unreachable. The message stays
        unacked meanwhile; a stopping worker cancels this wait after its grace period,
        and the lease and the reaper cover a worker that never gets back."""
        delay = 0.1
        while True:
            try:
                result = await op()
            except TRANSIENT_ERRORS as exc:
                log.warning("PostgreSQL unreachable; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            return result


def _backoff_of(row: Row) -> Backoff | None:
    """The task's own backoff (``backoff`` in its request), if it set one."""
    spec = row["backoff"]
    return Backoff(spec["base_s"], spec["factor"], spec["cap_s"]) if spec else None


async def _call(handler: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await handler()
    except (SystemExit, KeyboardInterrupt) as exc:
        # Raised in a handler they would stop the whole worker (its other tasks with
        # it); a handler's exception fails its attempt.
        raise RuntimeError(f"the handler raised {type(exc).__name__}") from exc


def _ended_unstopped(handler: asyncio.Task[Any]) -> bool:
    """Whether the handler ended and no stop reached it: done, not cancelled, not told
    (cancelling() is 0; a def handler's run uncancels itself when its thread had
    returned before the stop came, see ThreadRun)."""
    return handler.done() and not handler.cancelled() and handler.cancelling() == 0


def start_handler(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """The handler's task, its first step run now (Python 3.12+) rather than at the
    loop's next turn: a handler that returns without waiting (``demo.noop``, a cache
    hit) is done at once, and the run skips the timer and the wait for it. Under
    uvloop, starting a task and waiting for it with a timeout cost 10.2 µs of CPU,
    an eager start and the check 0.9."""
    if sys.version_info >= (3, 12):
        # The loop given: 3.12.1's Task found no loop of its own to start eagerly on.
        loop = asyncio.get_running_loop()
        return asyncio.Task(coro, loop=loop, name=name, eager_start=True)
    return asyncio.create_task(coro, name=name)


def _interrupted(reason: StopReason) -> dict[str, Any]:
    return {
        "type": "interrupted",
        "message": f"attempt interrupted ({reason.value})",
        "retryable": True,
    }


def _failed(kind: str, message: str, *, retryable: bool) -> Outcome:
    return Outcome(
        "failed",
        error={
            "type": kind[:200].replace("\x00", ""),
            "message": message[:4000].replace("\x00", ""),
            "retryable": retryable,
        },
        retryable=retryable,
    )


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "args"
    return f"{loc}: {first['msg']}"


def _jsonable(headers: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(orjson.dumps(dict(headers), default=str))
    return out
