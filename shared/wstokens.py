"""Short-lived, single-use tokens that let a browser open one WebSocket (or SSE) stream for
its tenant: browsers cannot set an ``Authorization`` header on a WebSocket. And task
tokens, which open the SSE stream of one task, as often as asked until they expire: an
``EventSource`` reconnects by itself with the URL it was given, so the token in that
URL must outlive one use.

Redis holds ``sha256(token) -> tenant_id`` (a task token: ``tenant_id task_id key_id``,
the API key that asked for it, so that revoking the key ends it) with a TTL, never the
token itself, so a dump of Redis opens nothing. ``redeem`` of a
single-use token is one ``GETDEL``: atomic, so it opens at most one connection even
when two gateways race for it. A task token is marked by a prefix, so the gateway knows
which command to send before it asks: a single-use token can never be read without
being spent."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
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
    for as long as the API key ``key_id`` is not revoked (None: a task token issued before
    tokens named their key, or a single-use token, which lives a minute)."""

    tenant_id: UUID
    task_id: UUID | None = None
    key_id: str | None = None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue(
    redis: Redis,
    wire: Wire,
    tenant_id: UUID,
    ttl_s: float,
    task: tuple[UUID, str] | None = None,
) -> tuple[str, datetime]:
    """Create a token for ``tenant_id`` valid for ``ttl_s`` (with ``task``, a task id and
    the id of the API key asking: a task token); return it and its expiry."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    value = str(tenant_id)
    if task is not None:
        task_id, key_id = task
        if not _KEY_ID.fullmatch(key_id):
            raise ValueError(f"not a key id: {key_id!r}")
        token = _TASK_PREFIX + token
        value = f"{tenant_id} {task_id} {key_id}"
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

    A single-use token is deleted by the same command that reads it: a second use
    fails. A task token is only read."""
    if not token or len(token) > _MAX_TOKEN_LEN:
        return None
    key = wire.ws_token(token_hash(token))
    task_token = token.startswith(_TASK_PREFIX)
    raw = await (redis.get(key) if task_token else redis.getdel(key))
    if raw is None:
        return None
    return parse_grant(raw.decode() if isinstance(raw, bytes) else str(raw), task_token)


def parse_grant(value: str, task_token: bool) -> Grant | None:
    """The grant stored as ``value`` for a token of that kind; None if it is not one
    (a value that does not fit the token's kind opens nothing). Pure."""
    parts = value.split(" ")
    # A task token without a key id was issued by an API of the previous release.
    if len(parts) not in ((2, 3) if task_token else (1,)):
        return None
    key_id = parts.pop() if len(parts) == 3 else None
    if key_id is not None and not _KEY_ID.fullmatch(key_id):
        return None
    try:
        ids = [UUID(p) for p in parts]
    except ValueError:
        return None
    return Grant(ids[0], ids[1] if task_token else None, key_id)
