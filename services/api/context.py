"""What the handlers need, built once per process and stored under typed app keys."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from services.api.auth import Authenticator
from services.api.backpressure import QueueMonitor
from services.api.ratelimit import RateLimiter
from services.api.repository import ApiRepository
from services.api.settings import ApiSettings
from services.api.tasktypes import TaskTypes
from shared.events import EventSink
from shared.relay import OutboxRelay
from shared.wire import Wire


@dataclass(frozen=True)
class Services:
    settings: ApiSettings
    wire: Wire
    repo: ApiRepository
    auth: Authenticator
    types: TaskTypes
    limiter: RateLimiter
    monitor: QueueMonitor
    relay: OutboxRelay | None
    events: EventSink
    redis: Redis
    # The process's stop signal (None in an app built by a test).
    stop: asyncio.Event | None = None

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()


SERVICES = web.AppKey("services", Services)
