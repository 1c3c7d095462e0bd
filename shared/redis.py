"""Redis plumbing: one client per process, every call under a timeout."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Connections a process keeps to Redis. Past them a call waits for a free one (at most
# the call's timeout): redis-py's default pool raises at once past 100, which a burst of
# WebSocket subscribes or API requests reaches.
MAX_CONNECTIONS = 64


def create_client(url: str, timeout: float, max_connections: int = MAX_CONNECTIONS) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=15,
        # One quick retry rides out a pooled connection that Redis dropped (a restart);
        # a Redis that is down fails the call at once (and trips the caller's breaker).
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    # The client owns the pool: closing it closes the connections.
    return Redis.from_pool(pool)
