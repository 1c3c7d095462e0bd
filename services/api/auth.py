"""Bearer API-key authentication: the key names its id, the secret is checked against
the stored hash in constant time, and lookups (hits and misses) are cached briefly.

A key's lookup is made once however many of its requests miss the cache together: when
a busy key's entry expires, every request in flight misses at the same moment, and each
took a pooled connection for the same row (64 at once in the benchmark, every 5 s)."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from services.api.problems import ProblemException
from services.api.repository import ApiRepository, Principal
from shared import keys
from shared.singleflight import SingleFlight

log = logging.getLogger(__name__)

_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="longhaul"'}


class Authenticator:
    def __init__(self, repo: ApiRepository, cache_s: float, max_entries: int = 10_000) -> None:
        self._repo = repo
        self._cache_s = cache_s
        self._max = max_entries
        # Hits and misses apart: misses are anyone's to make (random key ids), and
        # filling the cache with them must not evict the keys in use.
        self._hits: dict[str, tuple[float, tuple[bytes, Principal]]] = {}
        self._misses: dict[str, float] = {}
        self._lookups: SingleFlight[str, tuple[bytes, Principal] | None] = SingleFlight(
            "api-key-lookup"
        )

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ProblemException(
                401,
                "Unauthorized",
                "send Authorization: Bearer <api key>",
                slug="unauthorized",
                headers=_UNAUTHORIZED,
            )
        parsed = keys.parse(key.strip())
        found = await self._lookup(parsed.key_id) if parsed else None
        if parsed is None or found is None or not keys.verify(parsed, found[0]):
            # The key id is public (it names the key, not its secret): safe to log.
            log.info(
                "API key refused",
                extra={
                    "key_id": parsed.key_id if parsed else None,
                    "reason": "malformed" if parsed is None else "unknown, revoked or wrong secret",
                },
            )
            raise ProblemException(
                401,
                "Unauthorized",
                "the API key is not valid",
                slug="unauthorized",
                headers=_UNAUTHORIZED,
            )
        return found[1]

    async def _lookup(self, key_id: str) -> tuple[bytes, Principal] | None:
        now = time.monotonic()
        hit = self._hits.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self._misses.get(key_id, 0.0) > now:
            return None
        return await self._lookups.run(key_id, lambda: self._fetch(key_id))

    async def _fetch(self, key_id: str) -> tuple[bytes, Principal] | None:
        found = await self._repo.api_key(key_id)
        expires = time.monotonic() + self._cache_s
        # Crude, but bounded: each kind is emptied when full.
        if found is None:
            if len(self._misses) >= self._max:
                self._misses.clear()
            self._misses[key_id] = expires
        else:
            if len(self._hits) >= self._max:
                self._hits.clear()
            self._hits[key_id] = (expires, found)
        return found
