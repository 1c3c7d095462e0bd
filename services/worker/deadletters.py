"""Moves what the broker dead-lettered (crash loops past the queue's delivery limit)
from the dead-letter queue into the ``dead_letters`` table, with the reason, and fails
the task the message was for, so that it ends and can be redriven."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError

from services.worker.repository import Letter, WorkerRepository
from shared.errors import MessageError
from shared.events import EventSink
from shared.schemas import parse_task_message
from shared.taskrows import event_from_row

log = logging.getLogger(__name__)


# A dead letter that could not be stored (PostgreSQL away) is handed back this much
# later: the broker redelivers at once, and each turn would be a spin.
RETRY_S = 1.0


class DeadLetterSink:
    def __init__(
        self,
        queue: AbstractQueue,
        repo: WorkerRepository,
        events: EventSink,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._queue = queue
        self._repo = repo
        self._events = events
        self._pause = pause
        self._tag: str | None = None

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self, timeout: float) -> None:
        if self._tag is not None:
            tag, self._tag = self._tag, None
            # Bounded, like every call: with the broker down the channel never answers.
            with contextlib.suppress(AMQPError, RuntimeError, TimeoutError):
                await asyncio.wait_for(self._queue.cancel(tag), timeout)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Rejected (requeued) on error: a dead letter is never dropped.
        async with message.process(requeue=True):
            try:
                await self._store(message)
            except Exception as exc:
                log.warning("dead letter not stored yet", extra={"error": repr(exc)[:300]})
                await self._pause(RETRY_S)
                raise

    async def _store(self, message: AbstractIncomingMessage) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        reason = _text(headers.get("x-first-death-reason")) or "dead-lettered"
        deliveries = headers.get("x-delivery-count")  # not set by every RabbitMQ version
        detail = f"dead-lettered by the broker ({reason})" + (
            f" after {deliveries} deliveries" if deliveries is not None else ""
        )
        try:
            task = parse_task_message(message.body)
        except MessageError:
            task = None
        letter = Letter(reason, detail, message.body, _jsonable(headers))
        if task is None:
            await self._repo.dead_letter(letter)
        else:
            error = {"type": "poison", "message": detail, "retryable": False}
            row = await self._repo.dead_letter_task(task, error, letter)
            if row is not None:
                await self._events.emit([event_from_row(row)])
        log.warning(
            "dead letter stored",
            extra={"reason": reason, "task": str(task.task_id) if task else None},
        )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else None


def _jsonable(headers: dict[str, Any]) -> dict[str, Any]:
    # x-death is a list of tables with timestamps and bytes: keep it readable, not exact.
    return {
        k: (
            _text(v)
            if isinstance(v, bytes)
            else v
            if isinstance(v, int | str | bool | float)
            else str(v)
        )
        for k, v in headers.items()
    }
