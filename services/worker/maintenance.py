"""The worker's periodic jobs: renewing its leases (and noticing cancellations the
control channel missed), and reaping attempts whose worker stopped renewing."""

from __future__ import annotations

import asyncio
import logging
import random

from prometheus_client import Counter

from services.worker.repository import WorkerRepository
from services.worker.runner import Runner, StopReason
from shared.db import TRANSIENT_ERRORS
from shared.events import EventSink
from shared.taskrows import event_from_row

log = logging.getLogger(__name__)

REAPED = Counter(
    "longhaul_worker_reaped_total", "Attempts requeued or failed after their lease ran out"
)


async def heartbeat(
    repo: WorkerRepository, runner: Runner, worker_id: str, lease_s: float, stop: asyncio.Event
) -> None:
    """Renew every running attempt's lease each third of the lease, in one statement."""
    while not await _wait(stop, lease_s / 3):
        ids = list(runner.running)
        try:
            cancel = await repo.renew_leases(ids, worker_id, lease_s)
        except TRANSIENT_ERRORS as exc:
            log.warning("lease renewal failed", extra={"error": repr(exc)})
            continue
        for task_id in cancel:
            if (running := runner.running.get(task_id)) is not None:
                running.stop(StopReason.CANCELLED)


async def reaper(
    repo: WorkerRepository, events: EventSink, lease_s: float, stop: asyncio.Event
) -> None:
    """Requeue attempts whose lease expired. Every worker runs one; SKIP LOCKED lets
    them share the work, and jitter keeps them from waking together."""
    interval = max(0.5, lease_s / 3)
    while not await _wait(stop, interval * random.uniform(0.5, 1.0)):  # noqa: S311
        try:
            rows = await repo.reap()
        except TRANSIENT_ERRORS as exc:
            log.warning("reaper failed", extra={"error": repr(exc)})
            continue
        if rows:
            REAPED.inc(len(rows))
            log.warning("reaped attempts whose lease expired", extra={"count": len(rows)})
            await events.emit([event_from_row(r) for r in rows])


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
