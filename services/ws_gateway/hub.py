"""The process's one Redis subscriber and its fan-out.

One ``PSUBSCRIBE <namespace>:events:*`` per gateway process: subscribing once to the
pattern, rather than per task, means live delivery is already on before any client
subscribes (no race with a SUBSCRIBE acknowledgement) and there is no subscription churn
to replay after a reconnect. The price is that each gateway sees every event of the
namespace; at one Redis that is the same traffic a broadcast would cost anyway.

We own the read loop instead of relying on redis-py's reconnect, which does not reliably
resubscribe: on any error the pub/sub connection is dropped, a new one subscribes, and
every listener is told to resync (re-read its streams), since pub/sub is at-most-once and
whatever was published meanwhile is gone from it."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Protocol
from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.ws_gateway.metrics import GatewayMetrics
from services.ws_gateway.registry import Registry
from shared.errors import MalformedMessage
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

    def _client(self) -> Redis:
        # No retries: a failed read must reach our loop, which reconnects and resyncs,
        # rather than redis-py's own reconnect, which may come back unsubscribed.
        return Redis.from_url(
            self._redis_url,
            socket_connect_timeout=self._io_timeout,
            socket_keepalive=True,
            # A PING when idle this long: a silently dead connection is noticed.
            health_check_interval=max(1, int(self._io_timeout * 2)),
            retry=Retry(NoBackoff(), 0),
        )

    async def run(self) -> None:
        """Subscribe and dispatch until cancelled, reconnecting with backoff."""
        delay = 0.05
        while True:
            client = self._client()
            pubsub = client.pubsub()
            try:
                await asyncio.wait_for(
                    pubsub.psubscribe(self._wire.event_channel_pattern), self._io_timeout
                )
                # The confirmation proves the subscription is active on the server.
                await self._await_confirmation(pubsub)
                self.generation += 1
                self._metrics.hub_reconnects.inc()
                self._metrics.hub_connected.set(1)
                self.connected.set()
                if self.generation > 1:
                    log.info("redis subscriber resubscribed", extra={"generation": self.generation})
                    self._broadcast_resync()
                delay = 0.05
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        self._dispatch(message["channel"], message["data"])
            except (RedisError, OSError, TimeoutError) as exc:
                if self.connected.is_set():
                    log.warning("redis subscriber lost", extra={"error": repr(exc)})
                self.connected.clear()
                self._metrics.hub_connected.set(0)
            finally:
                await self._close_quietly(pubsub, client)
            # Full jitter: many gateways do not reconnect to a restarted Redis in step.
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311
            delay = min(delay * 2, 2.0)

    async def _await_confirmation(self, pubsub: Any) -> None:
        async with asyncio.timeout(self._io_timeout):
            while True:
                message = await pubsub.get_message(timeout=self._io_timeout)
                if message is not None and message.get("type") == "psubscribe":
                    return

    @staticmethod
    async def _close_quietly(pubsub: Any, client: Redis) -> None:
        try:
            await pubsub.aclose()
            await client.aclose()
        except (RedisError, OSError):
            pass  # the connection is already gone: nothing left to release

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
