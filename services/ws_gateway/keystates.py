"""Whether each API key behind tokens is active, as last read and for a short while: an
open by a revoked key's token is refused (401), and a task token's reconnects cost no
query each.

The revocation check reads the keys of the open streams through this every period
(revocation.py), so their answers are always that fresh; a key not seen is read once
at its open, and its answer kept ``ttl_s`` (the check's period: a revoked key's opens
are refused within the time its open streams are stopped in). At most ``max_keys``
answers are kept, the oldest dropped first: a flood of keys costs a query each, never
memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from shared.singleflight import SingleFlight

# Keys in use at once are few (a tenant's handful); an answer is about 200 bytes.
MAX_KEYS = 10_000


class Keys(Protocol):
    async def active_keys(self, key_ids: Sequence[str]) -> set[str]:
        """Those of these API keys that exist and are not revoked."""


class KeyStates:
    def __init__(
        self,
        keys: Keys,
        ttl_s: float,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = keys
        self._ttl_s = ttl_s
        self._max_keys = max_keys
        self._clock = clock
        # Key id: (active, when the read that said so began), oldest first.
        self._answers: dict[str, tuple[bool, float]] = {}
        # The opens of a key not seen come in bursts (an EventSource per tab): one read.
        self._reads: SingleFlight[str, bool] = SingleFlight("gateway-key-reads")

    async def active_keys(self, key_ids: Sequence[str]) -> set[str]:
        """Those of these keys that are active, read now; the answers are kept. Raises
        what the read raises."""
        read_at = self._clock()
        active = await self._keys.active_keys(key_ids)
        for key_id in key_ids:
            self._keep(key_id, key_id in active, read_at)
        return active

    async def key_active(self, key_id: str) -> bool:
        """Whether the key is active, as read within ``ttl_s``, else read now."""
        answer = self._answers.get(key_id)
        if answer is not None and self._clock() - answer[1] < self._ttl_s:
            return answer[0]
        return await self._reads.run(key_id, lambda: self._read(key_id))

    async def _read(self, key_id: str) -> bool:
        return key_id in await self.active_keys([key_id])

    def _keep(self, key_id: str, active: bool, read_at: float) -> None:
        kept = self._answers.pop(key_id, None)
        if kept is not None and kept[1] > read_at:
            # A read that began later answered first (a revocation it saw): it stands.
            active, read_at = kept
        self._answers[key_id] = (active, read_at)
        while len(self._answers) > self._max_keys:
            del self._answers[next(iter(self._answers))]
