"""Listens on the Redis control channel for cancellations of tasks running here.

We own the subscribe loop (redis-py's PubSub does not reliably resubscribe after a
reconnect): on any error we reconnect and subscribe again. A message missed meanwhile
is caught by the heartbeat, which reads ``cancel_requested_at``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from uuid import UUID

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.worker.runner import Runner, StopReason
from shared.wire import Wire

log = logging.getLogger(__name__)


async def listen(redis: Redis, wire: Wire, runner: Runner, stop: asyncio.Event) -> None:
    delay = 0.1
    while not stop.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(wire.control_channel)
            delay = 0.1
            while not stop.is_set():
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    _apply(message.get("data"), runner)
        except (RedisError, OSError) as exc:
            log.warning("control channel lost; resubscribing", extra={"error": repr(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            with contextlib.suppress(RedisError, OSError):
                # Typed only in newer redis-py releases.
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


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
