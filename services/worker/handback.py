"""Hand-backs held for their handler: an attempt a stopping worker interrupted, whose
handler ignored its cancellation, is handed back (its next attempt published) only once
that handler can no longer run: when it ends, or just before the process exits. Handed
back at once, the next attempt ran on another worker beside it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.worker.repository import WorkerRepository
from shared.db import ANY_PG_ERROR
from shared.schemas import TaskMessage

log = logging.getLogger(__name__)


class HandBacks:
    def __init__(self, repo: WorkerRepository, error: dict[str, Any]) -> None:
        """``error``: what the handed-back attempts say (the task's error and message)."""
        self._repo = repo
        self._error = error
        self._held: dict[asyncio.Task[Any], TaskMessage] = {}

    def hold(self, handler: asyncio.Task[Any], message: TaskMessage) -> None:
        """Hand ``message``'s attempt back once ``handler`` ended (see ``release``)."""
        self._held[handler] = message

    def __contains__(self, handler: object) -> bool:
        return handler in self._held

    def __bool__(self) -> bool:
        return bool(self._held)

    async def release(self, *, ended_only: bool = False) -> None:
        """Hand back the held attempts (only those whose handler ended, if ``ended_only``),
        in one transaction: while it commits the others' handlers may still run, and
        none's next attempt may start before. If it fails, their leases run out and the
        reaper hands them back. No event: each next attempt's claim backfills it."""
        chosen = [h for h in self._held if h.done() or not ended_only]
        if not chosen:
            return
        messages = [self._held.pop(h) for h in chosen]
        try:
            await self._repo.hand_back(messages, self._error)
        except ANY_PG_ERROR as exc:
            log.warning(
                "could not hand attempts back; their leases will run out",
                extra={"count": len(messages), "error": repr(exc)},
            )
