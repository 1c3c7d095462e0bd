"""The worker's periodic jobs: renewing its leases (and noticing cancellations the
control channel missed), stopping the attempts whose leases it could not renew, reaping
attempts whose worker stopped renewing, deleting finished tasks past their retention,
and firing the schedules that are due."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from uuid import UUID

import asyncpg
from prometheus_client import Counter

from services.worker import schedules
from services.worker.repository import WorkerRepository
from services.worker.runner import Runner, Running, StopReason
from shared.db import ANY_PG_ERROR, TRANSIENT_ERRORS
from shared.events import EventSink
from shared.failpoints import Failpoints
from shared.liveness import beat
from shared.taskrows import event_from_row

log = logging.getLogger(__name__)

REAPED = Counter(
    "longhaul_worker_reaped_total", "Attempts requeued or failed after their lease ran out"
)
PURGED = Counter("longhaul_worker_purged_total", "Finished tasks deleted after their retention")
LAPSED = Counter(
    "longhaul_worker_leases_lapsed_total",
    "Attempts stopped because this worker could not renew their leases for a lease",
)

SCHEDULE_FIRES = Counter(
    "longhaul_worker_schedule_fires_total",
    "Tasks made by schedules: one per fire time at most (the fires missed while no worker"
    " ran make one)",
)
SCHEDULE_SKIPS = Counter(
    "longhaul_worker_schedule_skips_total",
    "Fires of schedules that made no task, by reason (the schedule's last_error says more)",
    ["reason"],
)

# A lease unrenewed for this part of it stops its handler. The rest covers the watch's
# own period and a clock that disagrees a little: the reaper elsewhere reads the
# database's, and the next attempt must not start while this handler still runs.
_LAPSE_AT = 0.9
# After a failed renewal the heartbeat tries again this part of a lease later, not a
# third: a blip shorter than most of a lease is renewed in time and stops nothing.
_RETRY_AFTER = 0.1


# Each loop's longest wait between turns, here and in how long it may go without a
# beat (services/worker/app.py, shared.liveness).
def heartbeat_period_s(lease_s: float) -> float:
    return lease_s / 3


def lease_watch_period_s(lease_s: float) -> float:
    return lease_s / 20


def reaper_period_s(lease_s: float) -> float:
    return max(0.5, lease_s / 3)


def purge_period_s(retention_s: float) -> float:
    """A minute, or a tenth of the retention when that is shorter."""
    return min(60.0, retention_s / 10)


# What a reaper's failed round says about the leases: the database did not answer (in
# time, or at all for want of resources), so the heartbeats of live workers may have
# failed too.
_DATABASE_AWAY: tuple[type[BaseException], ...] = (
    *TRANSIENT_ERRORS,
    asyncpg.QueryCanceledError,  # a statement timeout: too slow to answer
    asyncpg.InsufficientResourcesError,  # out of connections, memory or disk
)

# A purge round deletes at most this many batches, then sleeps: a backlog (the first
# purge of a large table, a retention just shortened) goes at a bounded pace.
_PURGE_BATCHES = 10


async def heartbeat(
    repo: WorkerRepository,
    runner: Runner,
    worker_id: str,
    lease_s: float,
    stop: asyncio.Event,
    types: Sequence[str] = (),
    failpoints: Failpoints | None = None,
) -> None:
    """Renew every running attempt's lease each third of the lease, in one statement,
    and say this worker still runs ``types`` (workers lacking one pass its tasks on).
    Each attempt renewed is known good for a lease from when the renewal was sent (see
    lease_watch). An attempt asked to cancel is stopped; so is one found no longer ours
    (reaped while the database was away): its handler must not run on beside the next
    attempt."""
    delay = heartbeat_period_s(lease_s)
    while not await _wait(stop, delay):
        beat()
        if failpoints is not None:
            await failpoints.hit("worker.heartbeat")  # a hung loop, for the watchdog's test
        delay = lease_s * _RETRY_AFTER
        attempts = dict(runner.running)
        sent = time.monotonic()
        try:
            renewal = await repo.renew_leases(
                {t: r.claimed.message.attempt for t, r in attempts.items()}, worker_id, lease_s
            )
        except Exception as exc:  # noqa: BLE001 - see _survive
            _survive("lease renewal", exc)
            continue
        delay = heartbeat_period_s(lease_s)
        for task_id in renewal.renewed:
            if runner.running.get(task_id) is attempts[task_id]:
                attempts[task_id].lease_since = sent
        try:
            await repo.touch_types(types)
        except Exception as exc:  # noqa: BLE001 - see _survive
            _survive("type heartbeat", exc)
        for task_ids, reason in (
            (renewal.cancel, StopReason.CANCELLED),
            (renewal.lost, StopReason.FENCED),
        ):
            for task_id in task_ids:
                # The same attempt only: the task may have moved on meanwhile.
                if runner.running.get(task_id) is attempts[task_id]:
                    attempts[task_id].stop(reason)
        if renewal.lost:
            log.warning(
                "attempts found no longer ours: stopped", extra={"count": len(renewal.lost)}
            )


async def lease_watch(runner: Runner, lease_s: float, stop: asyncio.Event) -> None:
    """Stop every handler whose lease went unrenewed for most of a lease (this worker
    cut off from PostgreSQL alone): another worker's reaper requeues it once the lease
    runs out, and the task must not run twice at once. Waits on no database, so a
    renewal that hangs delays nothing here. The attempt's outcome (interrupted) is
    committed when the database answers, and refused if it was reaped meanwhile."""
    while not await _wait(stop, lease_watch_period_s(lease_s)):
        beat()
        stopped = lapsed(runner.running, time.monotonic(), lease_s * _LAPSE_AT)
        for running in stopped:
            running.stop(StopReason.LAPSED)
        if stopped:
            LAPSED.inc(len(stopped))
            log.warning(
                "leases unrenewed for a lease: handlers stopped",
                extra={
                    "count": len(stopped),
                    "task_ids": [str(r.claimed.message.task_id) for r in stopped[:10]],
                },
            )


def lapsed(running: Mapping[UUID, Running], now: float, limit_s: float) -> list[Running]:
    """The attempts whose handler runs on with a lease last known good ``limit_s`` or
    more before ``now``; each once (a stopped one is skipped), and none whose handler
    already ended (its outcome is being committed)."""
    return [
        r
        for r in running.values()
        if r.stop_reason is None
        and not (r.handler is not None and r.handler.done())
        and now - r.lease_since >= limit_s
    ]


async def reaper(
    repo: WorkerRepository, events: EventSink, lease_s: float, stop: asyncio.Event
) -> None:
    """Requeue attempts whose lease expired. Every worker runs one; SKIP LOCKED lets
    them share the work, and jitter keeps them from waking together.

    After a round that failed for want of the database (unreachable, or too slow to
    answer in time), the reaper waits a whole lease from when the database answers
    again before it reaps: an outage longer than a lease let the leases of live workers
    run out, and those workers renew them within a third of a lease of its end. Reaping
    at once would requeue, or fail on its last attempt, a task whose worker was about to
    finish it. Any other failure (a bug of ours, a statement refused) says nothing of
    the leases: the next round reaps as usual, so a dead worker's tasks wait no longer."""
    interval = reaper_period_s(lease_s)
    failed = False
    quiet_until = 0.0
    while not await _wait(stop, interval * random.uniform(0.5, 1.0)):  # noqa: S311
        beat()
        try:
            if failed:
                await repo.ping()
                failed = False
                quiet_until = time.monotonic() + lease_s
            if time.monotonic() < quiet_until:
                continue
            rows = await repo.reap()
        except Exception as exc:  # noqa: BLE001 - see _survive
            _survive("reaper", exc)
            # Still failed after an outage if the ping failed for any reason (a reconnect
            # storm's "too many connections" among them): the quiet lease must follow.
            failed = failed or isinstance(exc, _DATABASE_AWAY)
            continue
        if rows:
            REAPED.inc(len(rows))
            log.warning("reaped attempts whose lease expired", extra={"count": len(rows)})
            await events.emit([event_from_row(r) for r in rows])


async def purge(
    repo: WorkerRepository,
    retention_s: float,
    stop: asyncio.Event,
    *,
    batch: int = 1000,
) -> None:
    """Delete finished tasks older than ``retention_s``, a few batches every interval
    (a minute, or a tenth of the retention when that is shorter). Every worker runs
    one; SKIP LOCKED lets them share a backlog."""
    interval_s = purge_period_s(retention_s)
    while not await _wait(stop, interval_s * random.uniform(0.5, 1.0)):  # noqa: S311
        for _ in range(_PURGE_BATCHES):
            beat()
            try:
                deleted = await repo.purge_finished(retention_s, batch)
            except Exception as exc:  # noqa: BLE001 - see _survive
                _survive("purge of finished tasks", exc)
                break
            PURGED.inc(deleted)
            if deleted < batch or stop.is_set():
                break


async def fire_schedules(
    repo: WorkerRepository, poll_s: float, stop: asyncio.Event, *, batch: int = 100
) -> None:
    """Make the tasks of the schedules that are due, every ``poll_s`` or so, a batch per
    transaction (WorkerRepository.fire_schedules) until none is left. Every worker runs
    one; SKIP LOCKED lets them share the due schedules, each fired by one of them, and
    jitter keeps them from waking together. A schedule whose fire cannot make its task
    (its type gone, its args refused) is passed over until its next fire time, with a
    warning and its last_error saying why: it never stops the others."""
    while not await _wait(stop, poll_s * random.uniform(0.5, 1.0)):  # noqa: S311
        while not stop.is_set():
            beat()  # per batch: a backlog of due schedules takes many
            try:
                fires = await repo.fire_schedules(schedules.plan, batch)
            except Exception as exc:  # noqa: BLE001 - see _survive
                _survive("firing of schedules", exc)
                break
            _fired(fires)
            if len(fires) < batch:
                break


def _fired(fires: Sequence[schedules.Fire]) -> None:
    for fire in fires:
        where = {"schedule_id": str(fire.schedule_id), "tenant_id": str(fire.tenant_id)}
        if fire.task is not None:
            SCHEDULE_FIRES.inc()
            log.info("schedule fired", extra={**where, "task_id": str(fire.task.id)})
        elif fire.skipped is not None:
            SCHEDULE_SKIPS.labels(fire.skipped.value).inc()
            log.warning("schedule fire made no task", extra={**where, "error": fire.error})
        elif fire.repeated:
            log.warning(
                "schedule fire already stored: not stored again",
                extra={**where, "due_at": fire.due_at.isoformat()},
            )


def _survive(job: str, exc: Exception) -> None:
    """A periodic job goes on after any error: one that ended would end silently (a
    heartbeat lost to a deadlock with the success writer stopped renewing every lease
    of its worker, whose tasks were then reaped and run again while they ran)."""
    if isinstance(exc, ANY_PG_ERROR):
        log.warning(f"{job} failed", extra={"error": repr(exc)})
    else:
        log.error(f"{job} failed", exc_info=exc)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
