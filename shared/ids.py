"""Time-ordered UUIDv7 ids (RFC 9562), so that newest-first is an index scan on the key."""

from __future__ import annotations

import os
import threading
import time
import uuid

_RAND_BITS = 74  # rand_a (12) and rand_b (62)
_RAND_MAX = (1 << _RAND_BITS) - 1


class _Clock:
    """The latest id's (ms, random bits) of this process, under a lock (handlers may
    make ids from threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = (0, 0)


_clock = _Clock()


def uuid7() -> uuid.UUID:
    """A UUIDv7: 48 bits of Unix milliseconds, then 74 random bits, version and variant
    set. Strictly increasing within a process (RFC 9562's monotonic random, method 2):
    an id in the same millisecond as the one before (the tasks of a batch) takes that
    one's random bits plus one, so newest-first lists them in reverse order of creation
    rather than at random."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big") & _RAND_MAX
    with _clock.lock:
        last_ms, last_rand = _clock.last
        if ms <= last_ms:  # the same millisecond, or the clock stepped back
            ms, rand = last_ms, last_rand + 1
            if rand > _RAND_MAX:  # 2**74 ids in one millisecond: borrow the next one
                ms, rand = ms + 1, 0
        _clock.last = (ms, rand)
    return uuid.UUID(
        int=(ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76
        | (rand >> 62) << 64
        | 0x2 << 62
        | rand & ((1 << 62) - 1)
    )
