"""When a coalesced progress report may go out. Pure: the caller passes the clock."""

from __future__ import annotations


class RateGate:
    """Lets one report through per ``interval`` seconds; the caller holds back the rest
    and sends the latest when ``wait(now)`` has passed."""

    def __init__(self, max_per_s: float) -> None:
        self.interval = 1.0 / max_per_s
        self._last: float | None = None

    def wait(self, now: float) -> float:
        """Seconds until the next report may go out (0: now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.interval - now)

    def sent(self, now: float) -> None:
        self._last = now
