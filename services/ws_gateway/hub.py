"""The process's one Redis subscriber and its fan-out.

One ``PSUBSCRIBE <namespace>:events:*`` per gateway process: subscribing once to the
pattern, rather than per task, means live delivery is already on before any client
subscribes (no race with a SUBSCRIBE acknowledgement) and there is no subscription churn
to replay after a reconnect. The price is that each gateway sees every event of the
namespace; at one Redis that is the same traffic a broadcast would cost anyway.

We own the connection (services/ws_gateway/pubsub.py) and its reconnect: on any error
it is dropped, a new one subscribes, and every listener is told to resync (re-read its
streams), since pub/sub is at-most-once and whatever was published meanwhile is gone
from it."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Protocol
from uuid import UUID

from services.ws_gateway.metrics import GatewayMetrics
from services.ws_gateway.pubsub import PatternSubscriber, SubscriberRefused
from services.ws_gateway.registry import Registry
from shared.errors import MalformedMessage
from shared.redis import refused
from shared.schemas import ProgressEvent, parse_event
from shared.wire import Wire

log = logging.getLogger(__name__)


class Resync:
    """Queued to a listener after the subscriber reconnected: live events may be lost."""


RESYNC = Resync()


class Listener(Protocol):
    def offer(self, item: ProgressEvent | Resync) -> None:
        """Take an item without waiting; a full listener closes itself (slow consumer)."""


class Hub:
    def __init__(
        self,
        redis_url: str,
        wire: Wire,
        registry: Registry[Any],
        metrics: GatewayMetrics,
        *,
        io_timeout: float,
    ) -> None:
        self._redis_url = redis_url
        self._wire = wire
        self._registry = registry
        self._metrics = metrics
        self._io_timeout = io_timeout
        self._prefix = wire.event_channel("")
        self.connected = asyncio.Event()
        self.generation = 0
        # Why the last attempt to subscribe failed: for the startup error.
        self.last_error: str | None = None
        # Set while Redis refuses the user the subscription (NOPERM), and its answer: no
        # retry mends that.
        self._refused = asyncio.Event()
        self._refusal: str | None = None

    async def subscribed(self) -> None:
        """Wait for the first subscription; ConfigError at once should Redis refuse it
        (an ACL without PSUBSCRIBE or the pattern's channels): the start waited its whole
        timeout for it, then called Redis unreachable."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self.connected, self._refused)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not self.connected.is_set():
            command = f"PSUBSCRIBE {self._wire.event_channel_pattern}"
            raise refused(self._redis_url, command, self._refusal)

    async def run(self) -> None:
        """Subscribe and dispatch until cancelled, reconnecting with backoff."""
        delay = 0.05
        while True:
            subscriber: PatternSubscriber | None = None
            try:
                subscriber = await PatternSubscriber.open(
                    self._redis_url,
                    self._wire.event_channel_pattern,
                    self._dispatch,
                    io_timeout=self._io_timeout,
                    # A PING when idle this long: a silently dead connection is noticed.
                    idle_s=max(1.0, self._io_timeout * 2),
                )
                self.generation += 1
                self._metrics.hub_reconnects.inc()
                self._metrics.hub_connected.set(1)
                self.connected.set()
                self._refused.clear()
                if self.generation > 1:
                    log.info("redis subscriber resubscribed", extra={"generation": self.generation})
                    self._broadcast_resync()
                delay = 0.05
                await subscriber.watch()  # messages are dispatched meanwhile
            except (OSError, TimeoutError) as exc:  # SubscriberLost is an OSError
                self.last_error = repr(exc)
                if isinstance(exc, SubscriberRefused):
                    self._refusal = str(exc)
                    self._refused.set()
                if self.connected.is_set():
                    log.warning("redis subscriber lost", extra={"error": repr(exc)})
                self.connected.clear()
                self._metrics.hub_connected.set(0)
            finally:
                if subscriber is not None:
                    subscriber.close()
            # Full jitter: many gateways do not reconnect to a restarted Redis in step.
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311
            delay = min(delay * 2, 2.0)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        """Hand an event to its listeners without awaiting any of them."""
        name = channel.decode(errors="replace")
        if not name.startswith(self._prefix):
            return
        try:
            task_id = UUID(name[len(self._prefix) :])
        except ValueError:
            log.warning("event on a channel that names no task", extra={"channel": name})
            return
        listeners: tuple[Listener, ...] = self._registry.listeners(task_id)
        if not listeners:
            # Nobody here watches the task. Every gateway sees every event: with several,
            # most events are someone else's, and parsing them would be for nothing.
            return
        try:
            event = parse_event(data)
        except MalformedMessage as exc:
            log.warning("malformed live event", extra={"channel": name, "error": str(exc)})
            return
        if event.task_id != task_id:
            log.warning("event on another task's channel", extra={"channel": name})
            return
        for listener in listeners:
            listener.offer(event)

    def _broadcast_resync(self) -> None:
        connections: tuple[Listener, ...] = self._registry.connections()
        for listener in connections:
            listener.offer(RESYNC)
