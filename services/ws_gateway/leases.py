"""The per-tenant connection cap across every gateway process: each open connection (a
WebSocket or an SSE stream) holds a lease in Redis, a member of its tenant's sorted set
scored by when the lease lapses. Taking one is one script (drop the lapsed, count, add):
atomic, so two gateways cannot both take the last place. The process renews its leases
while their connections are open (adding back any Redis lost meanwhile: a restart, a
renewal that failed past their length) and drops each when its connection goes; a
process that dies stops renewing, and its leases lapse within ``lease_s``.

Redis' clock scores them, so gateways need not agree on the time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.liveness import beat
from shared.wire import Wire

log = logging.getLogger(__name__)

# A set lives as long as its longest lease: a gateway whose leases are shorter (its
# setting differs) never cuts the others' short.
_KEEP = """
local function keep(key, ms)
    if redis.call('PTTL', key) < ms then
        redis.call('PEXPIRE', key, ms)
    end
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
"""

# KEYS[1]: the tenant's set. ARGV: the lease's member, its length (ms), the cap.
_TAKE = (
    _KEEP
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
    return 0
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
keep(KEYS[1], tonumber(ARGV[2]))
return 1
"""
)

# KEYS: the sets of the tenants; ARGV[1]: the lease length (ms); ARGV[2..]: for each key
# in order, how many members follow, then them. A lease that is gone from Redis (it
# lapsed while renewals failed, or Redis restarted empty) is added back: its connection
# is open and counts, even if that puts its tenant over the cap for a while.
_RENEW = (
    _KEEP
    + """
local i = 2
for k = 1, #KEYS do
    local n = tonumber(ARGV[i])
    for j = 1, n do
        redis.call('ZADD', KEYS[k], now_ms + tonumber(ARGV[1]), ARGV[i + j])
    end
    keep(KEYS[k], tonumber(ARGV[1]))
    i = i + n + 1
end
return 0
"""
)


class Leases:
    def __init__(self, redis: Redis, wire: Wire, *, cap: int, lease_s: float) -> None:
        self._redis = redis
        self._wire = wire
        self._cap = cap
        self._lease_ms = max(1, int(lease_s * 1000))
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)
        # The leases this process holds, by member: their tenant.
        self._held: dict[str, UUID] = {}
        # Leases whose connection went, to be removed from Redis (they lapse anyway).
        self._dropped: list[tuple[UUID, str]] = []
        self._flush: asyncio.Task[None] | None = None
        # Renewals add leases back: a removal waits for the renewal in flight, which may
        # have read the lease before it was dropped, or it would come back until it lapses.
        self._writing = asyncio.Lock()

    async def take(self, tenant_id: UUID) -> str | None:
        """A lease for one more connection of the tenant, or None at its cap. Raises
        RedisError or OSError when Redis cannot tell."""
        member = uuid.uuid4().hex
        key = self._wire.tenant_connections(tenant_id)
        try:
            taken = await self._take(keys=[key], args=[member, self._lease_ms, self._cap])
        except (RedisError, OSError, TimeoutError):
            # It may have been taken before the reply was lost: give it back if we can,
            # else it lapses (never renewed).
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self._redis.zrem(key, member)
            raise
        if not taken:
            return None
        self._held[member] = tenant_id
        return member

    def drop(self, member: str) -> None:
        """The connection holding ``member`` went: no longer renewed, and removed from
        Redis soon (one write for the drops of the moment)."""
        tenant_id = self._held.pop(member, None)
        if tenant_id is None:
            return
        self._dropped.append((tenant_id, member))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(
                self._remove_dropped(), name="gateway-lease-drops"
            )

    async def run(self) -> None:
        """Renew the held leases every third of their length, until cancelled."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            beat()
            await self.renew()

    async def renew(self) -> None:
        async with self._writing:
            by_tenant: dict[UUID, list[str]] = {}
            for member, tenant_id in self._held.items():
                by_tenant.setdefault(tenant_id, []).append(member)
            try:
                for keys, args in _renewals(
                    {self._wire.tenant_connections(t): m for t, m in by_tenant.items()},
                    self._lease_ms,
                ):
                    await self._renew(keys=keys, args=args)
            except (RedisError, OSError, TimeoutError) as exc:
                # Leases that lapse meanwhile undercount the tenant until the next
                # renewal adds them back: let in, never shut out.
                log.warning("connection leases not renewed", extra={"error": repr(exc)})

    async def _remove_dropped(self) -> None:
        await asyncio.sleep(0)  # the drops of this turn in one write
        async with self._writing:
            while self._dropped:
                batch, self._dropped = self._dropped, []
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for tenant_id, member in batch:
                            pipe.zrem(self._wire.tenant_connections(tenant_id), member)
                        await pipe.execute()
                except (RedisError, OSError, TimeoutError) as exc:
                    log.info("dropped leases left to lapse", extra={"error": repr(exc)})

    async def aclose(self) -> None:
        """Give back every lease still held and wait for the removals (shutdown, once
        the server closed): a connection whose loss is seen after this is counted no
        longer, rather than until its lease lapses."""
        for member in list(self._held):
            self.drop(member)
        if self._flush is not None:
            await self._flush


# Members renewed per script call: each call blocks Redis while it runs.
_RENEW_CHUNK = 1000


def _renewals(
    members_of: dict[str, list[str]], lease_ms: int
) -> list[tuple[list[str], list[int | str]]]:
    """The renew script's calls (keys, args) for these sets' members, at most
    ``_RENEW_CHUNK`` members a call. Pure."""
    calls: list[tuple[list[str], list[int | str]]] = []
    keys: list[str] = []
    args: list[int | str] = [lease_ms]
    room = _RENEW_CHUNK
    for key, members in members_of.items():
        start = 0
        while start < len(members):
            if room == 0:
                calls.append((keys, args))
                keys, args, room = [], [lease_ms], _RENEW_CHUNK
            part = members[start : start + room]
            keys.append(key)
            args += [len(part), *part]
            room -= len(part)
            start += len(part)
    if keys:
        calls.append((keys, args))
    return calls
