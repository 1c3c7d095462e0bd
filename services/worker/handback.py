"""Attempts held for their handler: one whose handler ignored its cancellation is not
settled (its next attempt made possible) while that handler can still run. A timed-out
attempt is held by its run, which commits its outcome once the handler ended (see
``Runner._outlive``); one a stopping worker interrupted, or whose run the worker stopped
first, is handed back when its handler ends, or just before the process exits. Settled
at once, the next attempt ran on another worker beside it."""

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
        # Held by their run, which settles them itself unless the worker stops first.
        self._by_run: set[asyncio.Task[Any]] = set()

    def hold(
        self, handler: asyncio.Task[Any], message: TaskMessage, *, by_run: bool = False
    ) -> None:
        """Hand ``message``'s attempt back once ``handler`` ended (see ``release``), or,
        ``by_run``, leave it to its run until that calls ``settled`` or ``hand_back``."""
        self._held[handler] = message
        if by_run:
            self._by_run.add(handler)

    def by_run(self, handler: asyncio.Task[Any]) -> bool:
        return handler in self._by_run

    def settled(self, handler: asyncio.Task[Any]) -> None:
        """Its run commits the attempt's outcome: no longer held."""
        self._by_run.discard(handler)
        del self._held[handler]

    def hand_back(self, handler: asyncio.Task[Any]) -> None:
        """Its run stops first (the worker does): handed back as the others."""
        self._by_run.discard(handler)

    def __contains__(self, handler: object) -> bool:
        return handler in self._held

    def __bool__(self) -> bool:
        return bool(self._held)

    async def release(self, *, ended_only: bool = False) -> None:
        """Hand back the held attempts (only those whose handler ended, if ``ended_only``),
        in one transaction: while it commits the others' handlers may still run, and
        none's next attempt may start before. Called once every run has ended (a run
        cancelled while it held its attempt left it here). If it fails, their leases run
        out and the reaper hands them back. No event: each next attempt's claim
        backfills it."""
        chosen = [h for h in self._held if h.done() or not ended_only]
        if not chosen:
            return
        messages = [self._held.pop(h) for h in chosen]
        self._by_run.difference_update(chosen)
        try:
            await self._repo.hand_back(messages, self._error)
        except ANY_PG_ERROR as exc:
            log.warning(
                "could not hand attempts back; their leases will run out",
                extra={"count": len(messages), "error": repr(exc)},
            )
