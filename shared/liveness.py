"""Liveness of a process's essential loops: each beats once per turn, and /healthz says
503 naming a loop that has not beaten for longer than it may (a loop stuck on an await
for ever: the process looks alive and does nothing). shared.lifecycle.essential catches
a loop that ends; this one that hangs. Both stop the process for its supervisor to
restart: /healthz tells one that polls it, and the watchdog of shared.lifecycle ends the
process for one that only sees exits (compose's and systemd's restart policies).

A loop beats through ``beat()``, which finds its heart in the context essential() ran it
in: no loop's signature carries one, and a loop run outside (a test's) beats nothing."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Any

# How many of its periods a loop may miss before it is taken for hung. Several: a period
# of a slow database (each call bounded by LONGHAUL_IO_TIMEOUT_S) is no hang.
STALE_PERIODS = 3
# And never less than this: an event loop held up a few seconds (a long GC pause, a user's
# async handler that computes without awaiting) is slow, not hung, and a liveness probe's
# restart would throw away every running task for it.
MIN_STALE_S = 15.0

_HEART: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "longhaul_heart", default=None
)


def beat() -> None:
    """The running loop is alive (one turn). A monotonic read and a dict write."""
    heart = _HEART.get()
    if heart is not None:
        heart()


def stale_after(period_s: float, io_timeout_s: float, calls: int = 1) -> float:
    """How long a loop that waits ``period_s`` and then makes up to ``calls`` calls
    (each bounded by ``io_timeout_s``) between beats may go without one."""
    return max(MIN_STALE_S, STALE_PERIODS * (period_s + calls * io_timeout_s))


class Liveness:
    """The last beat of each watched loop. ``clock``: a test's own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._within: dict[str, float] = {}

    def context(self, name: str, within: float) -> contextvars.Context:
        """A context to run loop ``name`` in, its beats recorded; it counts as beaten
        now. ``within``: how long it may go without a beat (see stale_after)."""
        self._within[name] = within
        self._last[name] = self._clock()
        ctx = contextvars.copy_context()
        ctx.run(_HEART.set, lambda: self._beat(name))
        return ctx

    def forget(self, name: str) -> None:
        """A loop that has ended (a stop drained it): no longer watched."""
        self._within.pop(name, None)
        self._last.pop(name, None)

    def _beat(self, name: str) -> None:
        if name in self._last:
            self._last[name] = self._clock()

    def now(self) -> float:
        return self._clock()

    def stale(self, since: float | None = None) -> list[str]:
        """The loops hung now; ``since``: none counts as hung before its bound has run
        from then (a pause's end, for the watchdog). Also called from the watchdog's
        thread (shared.lifecycle) while the event loop adds and forgets loops: it reads
        copies."""
        now = self._clock()
        last = dict(self._last)
        within = dict(self._within)
        if since is not None:
            last = {n: max(t, since) for n, t in last.items()}
        return sorted(n for n, t in last.items() if n in within and now - t > within[n])

    def report(self) -> tuple[bool, dict[str, Any]]:
        """/healthz: alive unless a loop is stale; each loop's seconds since its beat."""
        now = self._clock()
        stale = self.stale()
        body: dict[str, Any] = {
            "status": "hung" if stale else "ok",
            "loops": {n: round(now - last, 3) for n, last in sorted(self._last.items())},
        }
        if stale:
            body["stale"] = stale
        return not stale, body
