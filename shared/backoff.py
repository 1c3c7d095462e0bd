"""Retry delays: exponential backoff with full jitter. Pure: no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 600.0

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay after the ``attempt``-th failure (1-based)."""
        exponent = max(0, attempt - 1)
        try:
            value = self.base_s * self.factor**exponent
        except OverflowError:  # float overflow: far past any cap
            return self.cap_s
        return float(min(self.cap_s, value))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, ceiling]. Spreads retries
        of tasks that failed together instead of retrying them in lockstep."""
        r = rng.random() if rng else random.random()  # noqa: S311 - jitter, not crypto
        return r * self.ceiling(attempt)
