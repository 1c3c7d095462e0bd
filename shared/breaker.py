"""A circuit breaker for an optional dependency (Redis): after a failure, calls fail
fast for a cool-down instead of each paying a timeout, then the next call probes.
Pure: the clock is passed in."""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(
        self, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._open_until = 0.0
        # After a failure, once the cool-down is over, one call probes and the others
        # fail fast for another cool-down (a hung dependency costs a timeout per
        # cool-down, not one per caller; a probe that never reports back, cancelled,
        # only delays the next).
        self._open = False

    def allow(self) -> bool:
        """Whether to try the dependency now: closed, or a probe after the cool-down."""
        if not self._open:
            return True
        now = self._clock()
        if now < self._open_until:
            return False
        self._open_until = now + self._cooldown_s
        return True

    def failed(self) -> None:
        self._open = True
        self._open_until = self._clock() + self._cooldown_s

    def succeeded(self) -> None:
        self._open = False
        self._open_until = 0.0
