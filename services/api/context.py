"""What the handlers need, built once per process and stored under typed app keys."""

from __future__ import annotations

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


SERVICES = web.AppKey("services", Services)
