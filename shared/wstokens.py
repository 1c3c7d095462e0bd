"""Short-lived, single-use tokens that let a browser open one WebSocket (or SSE) stream for
its tenant: browsers cannot set an ``Authorization`` header on a WebSocket.

Redis holds ``sha256(token) -> tenant_id`` with a TTL, never the token itself, so a dump
of Redis opens nothing. ``consume`` is one ``GETDEL``: atomic, so a token opens at most
one connection even when two gateways race for it."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from uuid import UUID

from redis.asyncio import Redis

from shared.wire import Wire

# 32 random bytes: nothing to guess, and a fast hash is enough to store it.
_TOKEN_BYTES = 32
# token_urlsafe(32) is 43 characters; anything far from that is not one of ours and
# is refused before it costs a Redis round trip.
_MAX_TOKEN_LEN = 128


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue(redis: Redis, wire: Wire, tenant_id: UUID, ttl_s: float) -> tuple[str, datetime]:
    """Create a token for ``tenant_id`` valid for ``ttl_s``; return it and its expiry."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    ttl_ms = max(1, int(ttl_s * 1000))
    expires_at = datetime.now(UTC) + timedelta(milliseconds=ttl_ms)
    # NX: a collision of 256-bit tokens does not happen, but if it did we would rather
    # fail loudly than hand one tenant's stream to another.
    created = await redis.set(wire.ws_token(token_hash(token)), str(tenant_id), px=ttl_ms, nx=True)
    if not created:
        raise RuntimeError("ws token collision")
    return token, expires_at


async def consume(redis: Redis, wire: Wire, token: str) -> UUID | None:
    """The tenant a token was issued to, or None when it is unknown, expired or used.

    The token is deleted by the same command that reads it: a second use fails."""
    if not token or len(token) > _MAX_TOKEN_LEN:
        return None
    raw = await redis.getdel(wire.ws_token(token_hash(token)))
    if raw is None:
        return None
    value = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        return UUID(value)
    except ValueError:
        return None
