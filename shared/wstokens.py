"""Short-lived, single-use tokens that let a browser open one WebSocket (or SSE) stream for
its tenant: browsers cannot set an ``Authorization`` header on a WebSocket. And task
tokens, which open the SSE stream of one task, as often as asked until they expire: an
``EventSource`` reconnects by itself with the URL it was given, so the token in that
URL must outlive one use.

Redis holds ``sha256(token) -> tenant_id key_id`` (a task token: ``tenant_id task_id
key_id``), with the API key that asked for it so that revoking the key ends what the
token opened, with a TTL; never the token itself, so a dump of Redis opens nothing.
``redeem`` of a
single-use token is one ``GETDEL`` (in a transaction with its ``PTTL``): atomic, so it
opens at most one connection even when two gateways race for it. A gateway that then
refuses the connection for what the client can wait out (a cap, an outage) puts it back
with ``give_back``, for what was left of its life: the retry needs no new token, and a
second use meanwhile was refused. A task token is marked by a prefix, so the gateway
knows which command to send before it asks: a single-use token can never be read
without being spent."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

from redis.asyncio import Redis

from shared.wire import Wire

# 32 random bytes: nothing to guess, and a fast hash is enough to store it.
_TOKEN_BYTES = 32
# token_urlsafe(32) is 43 characters; anything far from that is not one of ours and
# is refused before it costs a Redis round trip.
_MAX_TOKEN_LEN = 128
# Outside token_urlsafe's alphabet: no single-use token starts with it.
_TASK_PREFIX = "t."
# An API key's public id (shared.keys), as stored in a task token's value.
_KEY_ID = re.compile(r"[a-z0-9]{1,64}")


@dataclass(frozen=True)
class Grant:
    """What a token opens: a stream of the tenant's, or with ``task_id`` that task's only,
    for as long as the API key ``key_id`` is not revoked (None: a token issued before
    tokens named their key, by an API of an earlier release, or one issued without a
    key, as the benchmark does)."""

    tenant_id: UUID
    task_id: UUID | None = None
    key_id: str | None = None
    # A single-use token's: the milliseconds it had left when it was spent, for
    # give_back() (None: nothing to give back). Not part of what it opens.
    ttl_ms: int | None = field(default=None, compare=False)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue(
    redis: Redis,
    wire: Wire,
    tenant_id: UUID,
    ttl_s: float,
    *,
    key_id: str | None = None,
    task_id: UUID | None = None,
) -> tuple[str, datetime]:
    """Create a token for ``tenant_id`` valid for ``ttl_s``, asked for by the API key
    ``key_id`` (with ``task_id``, a task token, which must name its key); return it and
    its expiry."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    if key_id is not None and not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"not a key id: {key_id!r}")
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    if task_id is not None:
        if key_id is None:
            raise ValueError("a task token names the API key asking for it")
        token = _TASK_PREFIX + token
    value = _value(Grant(tenant_id, task_id, key_id))
    ttl_ms = max(1, int(ttl_s * 1000))
    expires_at = datetime.now(UTC) + timedelta(milliseconds=ttl_ms)
    # NX: a collision of 256-bit tokens does not happen, but if it did we would rather
    # fail loudly than hand one tenant's stream to another.
    created = await redis.set(wire.ws_token(token_hash(token)), value, px=ttl_ms, nx=True)
    if not created:
        raise RuntimeError("ws token collision")
    return token, expires_at


async def redeem(redis: Redis, wire: Wire, token: str) -> Grant | None:
    """What a token opens, or None when it is unknown, expired or used.

    A single-use token is deleted by the same transaction that reads it: a second use
    fails (until give_back()). A task token is only read."""
    if not token or len(token) > _MAX_TOKEN_LEN:
        return None
    key = wire.ws_token(token_hash(token))
    if token.startswith(_TASK_PREFIX):
        return _parsed(await redis.get(key), task_token=True)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.pttl(key)
        pipe.getdel(key)
        ttl_ms, raw = await pipe.execute()
    grant = _parsed(raw, task_token=False)
    # A token at the end of its life (or stored without one) is not given back.
    return None if grant is None else replace(grant, ttl_ms=ttl_ms if ttl_ms > 0 else None)


async def give_back(redis: Redis, wire: Wire, token: str, grant: Grant) -> bool:
    """Put a single-use token spent by ``redeem`` back, for the life it had left (and
    the moment it was out); False for one it cannot (a task token is never spent).
    Raises RedisError or OSError when Redis cannot take it."""
    if grant.ttl_ms is None:
        return False
    # NX: no other value can have appeared at this hash, but never overwrite one.
    key = wire.ws_token(token_hash(token))
    return bool(await redis.set(key, _value(grant), px=grant.ttl_ms, nx=True))


def _value(grant: Grant) -> str:
    """What Redis holds for a token that opens ``grant``; parse_grant() reads it."""
    parts = [str(grant.tenant_id)]
    if grant.task_id is not None:
        parts.append(str(grant.task_id))
    if grant.key_id is not None:
        parts.append(grant.key_id)
    return " ".join(parts)


def _parsed(raw: bytes | str | None, task_token: bool) -> Grant | None:
    if raw is None:
        return None
    return parse_grant(raw.decode() if isinstance(raw, bytes) else str(raw), task_token)


def parse_grant(value: str, task_token: bool) -> Grant | None:
    """The grant stored as ``value`` for a token of that kind; None if it is not one
    (a value that does not fit the token's kind opens nothing). Pure."""
    parts = value.split(" ")
    named = 2 if task_token else 1  # the ids before the key id
    # Without a key id: issued by an API of an earlier release (or the benchmark's).
    if len(parts) not in (named, named + 1):
        return None
    key_id = parts.pop() if len(parts) > named else None
    if key_id is not None and not _KEY_ID.fullmatch(key_id):
        return None
    try:
        ids = [UUID(p) for p in parts]
    except ValueError:
        return None
    return Grant(ids[0], ids[1] if task_token else None, key_id)
