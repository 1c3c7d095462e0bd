"""The services' Redis client against the real Redis: a burst of concurrent calls
larger than its connection pool waits for a connection instead of failing.

Caught in the benchmark: 1,000 WebSocket clients subscribing at once made the gateway
read streams and redeem tokens concurrently; past redis-py's 100 pooled connections
each further call raised at once, so connections were refused and catch-ups fell back
to PostgreSQL."""

from __future__ import annotations

import asyncio

from shared.redis import create_client
from tests.conftest import Deployment


async def test_a_burst_beyond_the_pool_waits_for_connections(deployment: Deployment) -> None:
    client = create_client(deployment.redis_url, 10.0)
    key = f"{deployment.namespace}:burst"
    try:
        # BLPOP holds its connection for the whole timeout, so the calls overlap for sure.
        results = await asyncio.gather(
            *(client.blpop([f"{key}:{i}"], timeout=0.2) for i in range(300)),
            return_exceptions=True,
        )
    finally:
        await client.aclose()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert results == [None] * 300
