"""Ids: time-ordered UUIDv7 (RFC 9562), so that newest-first is an index scan on the
key, and random hex ids (trace and request ids), all from one buffer of the OS's random
bytes."""

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
        self.clear()

    def clear(self) -> None:
        # In a forked child too: a new lock (a thread of the parent may have held the
        # old one), and no last id, lest the child's next in the same millisecond be
        # the parent's next (the last's random bits plus one).
        self.lock = threading.Lock()
        self.last = (0, 0)


_clock = _Clock()


class _Entropy:
    """The OS's random bytes (``os.urandom``), drawn 4 KiB at a time: a request made
    three ids, each a ``getrandom()`` system call of its own (4 % of the API's samples at
    saturation); now one call serves about 200 requests. The bytes are the same CSPRNG's.
    Under a lock (handlers may make ids from threads); emptied in a forked child, which
    must not repeat its parent's bytes."""

    _DRAW = 4096

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        # A new lock too: a thread of the parent may have held the old one at the fork.
        self.lock = threading.Lock()
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        with self.lock:
            if self.pos + n > len(self.buf):
                self.buf, self.pos = os.urandom(max(self._DRAW, n)), 0
            start = self.pos
            self.pos = start + n
            return self.buf[start : self.pos]


_entropy = _Entropy()


def _forked() -> None:
    _clock.clear()
    _entropy.clear()


os.register_at_fork(after_in_child=_forked)


def random_hex(n_bytes: int = 16) -> str:
    """``n_bytes`` random bytes as hex: a W3C trace id (16), a request id. Not for
    secrets: tokens and keys take theirs from ``secrets``."""
    return _entropy.take(n_bytes).hex()


def uuid7() -> uuid.UUID:
    """A UUIDv7: 48 bits of Unix milliseconds, then 74 random bits, version and variant
    set. Strictly increasing within a process (RFC 9562's monotonic random, method 2):
    an id in the same millisecond as the one before (the tasks of a batch) takes that
    one's random bits plus one, so newest-first lists them in reverse order of creation
    rather than at random."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(_entropy.take(10), "big") & _RAND_MAX
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
