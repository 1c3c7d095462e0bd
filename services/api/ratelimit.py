"""Per-tenant rate limit: a token bucket in Redis, shared by every API process.

One Lua script refills and takes a token atomically and says how long until the next
token. If Redis is unreachable we let requests through: the limit protects fairness,
while refusing everyone for a Redis outage would turn it into a full outage."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from uuid import UUID

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.breaker import Breaker
from shared.wire import Wire

log = logging.getLogger(__name__)

LIMITED = Counter("longhaul_api_rate_limited_total", "Requests refused with 429")
FAIL_OPEN = Counter(
    "longhaul_api_rate_limit_fail_open_total", "Requests let through because Redis was unreachable"
)

# KEYS[1] bucket; ARGV: rate/s, burst, cost. Redis' own clock, so API hosts' clocks
# need not agree. Returns {allowed, ms until enough tokens}.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int = 0


class RateLimiter:
    def __init__(
        self, redis: Redis, wire: Wire, rate_per_s: float, burst: int, breaker: Breaker
    ) -> None:
        self._redis = redis
        self._breaker = breaker
        self._wire = wire
        self._rate = rate_per_s
        self._burst = burst
        self._script = redis.register_script(_BUCKET)

    async def take(
        self,
        tenant_id: UUID,
        cost: int = 1,
        rate_per_s: float | None = None,
        burst: int | None = None,
    ) -> Decision:
        rate = rate_per_s or self._rate
        if rate <= 0:
            return Decision(True)
        size = burst or self._burst
        cost = min(cost, size)  # a batch larger than the burst still gets through when full
        if not self._breaker.allow():
            FAIL_OPEN.inc()
            return Decision(True)
        try:
            allowed, wait_ms = await self._script(
                keys=[self._wire.rate_bucket(tenant_id)], args=[rate, size, cost]
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._breaker.failed()
            FAIL_OPEN.inc()
            log.warning("rate limiter unavailable; allowing", extra={"error": repr(exc)})
            return Decision(True)
        if int(allowed):
            return Decision(True)
        LIMITED.inc()
        return Decision(False, max(1, math.ceil(int(wait_ms) / 1000)))
