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

    def allow(self) -> bool:
        """Whether to try the dependency now (closed, or the cool-down is over)."""
        return self._clock() >= self._open_until

    def failed(self) -> None:
        self._open_until = self._clock() + self._cooldown_s

    def succeeded(self) -> None:
        self._open_until = 0.0
