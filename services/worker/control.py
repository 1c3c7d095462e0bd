"""Listens on the Redis control channel for cancellations of tasks running here.

We own the subscribe loop (redis-py's PubSub does not reliably resubscribe after a
reconnect): on any error we reconnect and subscribe again. A message missed meanwhile
is caught by the heartbeat, which reads ``cancel_requested_at``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from uuid import UUID

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import NoPermissionError, RedisError

from services.worker.runner import Runner, StopReason
from shared.liveness import beat
from shared.redis import refused
from shared.wire import Wire

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _pubsub(redis: Redis, *, confirmations: bool = False) -> AsyncIterator[PubSub]:
    pubsub = redis.pubsub(ignore_subscribe_messages=not confirmations)
    try:
        yield pubsub
    finally:
        with contextlib.suppress(RedisError, OSError):
            # Typed only in newer redis-py releases.
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


async def may_subscribe(redis: Redis, wire: Wire, url: str, timeout: float) -> None:
    """A start's check that the user of ``url`` may SUBSCRIBE to the control channel.
    Refused (NOPERM), cancellations would reach running tasks only at the next
    heartbeat, and the listener would warn every few seconds for ever: a ConfigError.
    Any other error, or no answer within ``timeout``, is left to the listener's retries."""
    try:
        async with _pubsub(redis, confirmations=True) as pubsub:
            await pubsub.subscribe(wire.control_channel)
            # Redis's answer, the confirmation or NOPERM, comes with the next read.
            await pubsub.get_message(timeout=timeout)
    except NoPermissionError as exc:
        raise refused(url, f"SUBSCRIBE {wire.control_channel}", exc) from None
    except (RedisError, OSError):
        pass


# The longest wait before subscribing again (services/worker/app.py bounds its beats by it).
RESUBSCRIBE_MAX_S = 5.0


async def listen(redis: Redis, wire: Wire, runner: Runner, stop: asyncio.Event) -> None:
    delay = 0.1
    while not stop.is_set():
        beat()
        try:
            async with _pubsub(redis) as pubsub:
                await pubsub.subscribe(wire.control_channel)
                delay = 0.1
                while not stop.is_set():
                    beat()
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        _apply(message.get("data"), runner)
        except (RedisError, OSError) as exc:
            log.warning("control channel lost; resubscribing", extra={"error": repr(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESUBSCRIBE_MAX_S)


def _apply(data: object, runner: Runner) -> None:
    try:
        command = orjson.loads(data) if isinstance(data, bytes | str) else None
        if not isinstance(command, dict) or command.get("op") != "cancel":
            return
        task_id = UUID(str(command["task_id"]))
    except (orjson.JSONDecodeError, KeyError, ValueError):
        log.warning("ignoring a malformed control message")
        return
    if (running := runner.running.get(task_id)) is not None:
        running.stop(StopReason.CANCELLED)
