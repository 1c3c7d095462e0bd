"""A revoked API key ends the streams its tokens opened, within ``check_s``.

A token names the API key that asked for it (shared.wstokens), and each stream opened
with one is held here under that key while it is open. Every ``check_s`` the keys of
this process's open streams are read in one query, and the streams of a key no longer
active (revoked, or gone) are stopped: a WebSocket is closed with 1008, an SSE stream
ends and its client's reconnect is refused.

A check, not a message from the revoking command (Redis pub/sub, PostgreSQL NOTIFY): a
message can be missed (a gateway reconnecting or starting), so a periodic check would
be needed anyway as the backstop, and alone it costs one small query per period (the
keys in use are few, however many streams they opened) and nothing per event. What a
message would gain, an end within milliseconds rather than seconds, is worth little for
an operator's rare act that the API itself honours only within its auth cache's life.

``Holders`` is the pure bookkeeping; ``Revoker`` does the reading and the stopping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from services.ws_gateway.keystates import Keys
from services.ws_gateway.metrics import GatewayMetrics
from shared.db import ANY_PG_ERROR
from shared.liveness import beat

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    def stop(self) -> None:
        """End the stream: its handler tells the client and closes the connection."""


S = TypeVar("S", bound=Stoppable)


class Holders(Generic[S]):
    """The open streams of each API key. Kept here rather than on the streams: one
    attribute more on each connection costs every idle one (see handshake.py). Pure."""

    def __init__(self) -> None:
        self._of: dict[str, set[S]] = {}
        self._ids: dict[str, str] = {}  # each key id held, as the one string kept

    def add(self, key_id: str, stream: S) -> str:
        """Hold the stream under its key; returns the key id to discard it with, the same
        string for every stream of the key: a connection keeps no copy of its own."""
        key_id = self._ids.setdefault(key_id, key_id)
        self._of.setdefault(key_id, set()).add(stream)
        return key_id

    def discard(self, key_id: str, stream: S) -> bool:
        """Forget the stream; False when it was not held: its key's revocation took it."""
        held = self._of.get(key_id)
        if held is None or stream not in held:
            return False
        held.discard(stream)
        if not held:
            del self._of[key_id], self._ids[key_id]
        return True

    def key_ids(self) -> list[str]:
        return list(self._of)

    def take(self, key_ids: Iterable[str]) -> list[S]:
        """The streams held under these keys, no longer held."""
        taken: list[S] = []
        for key_id in key_ids:
            taken.extend(self._of.pop(key_id, ()))
            self._ids.pop(key_id, None)
        return taken


class Revoker(Generic[S]):
    def __init__(
        self, holders: Holders[S], keys: Keys, metrics: GatewayMetrics, check_s: float
    ) -> None:
        self._holders = holders
        self._keys = keys
        self._metrics = metrics
        self._check_s = check_s

    async def run(self) -> None:
        """Check every ``check_s`` until cancelled. A failed check waits for the next:
        a database away for a while must not bring the gateway down."""
        while True:
            await asyncio.sleep(self._check_s)
            beat()
            try:
                await self.check()
            except ANY_PG_ERROR as exc:
                log.warning("API key check failed", extra={"error": repr(exc)})

    async def check(self) -> int:
        """One check; returns how many streams it stopped."""
        key_ids = self._holders.key_ids()
        if not key_ids:
            return 0
        active = await self._keys.active_keys(key_ids)
        # The streams opened while the query ran are taken too: their key is as revoked.
        revoked = [key_id for key_id in key_ids if key_id not in active]
        stopped = self._holders.take(revoked)
        for stream in stopped:
            stream.stop()
        if stopped:
            self._metrics.revoked.inc(len(stopped))
            log.info(
                "streams of revoked API keys stopped",
                extra={"key_ids": revoked, "count": len(stopped)},
            )
        return len(stopped)
