"""Redis plumbing: one client per process, every call under a timeout."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def create_client(url: str, timeout: float) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=15,
        # One quick retry rides out a pooled connection that Redis dropped (a restart);
        # a Redis that is down fails the call at once (and trips the caller's breaker).
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
