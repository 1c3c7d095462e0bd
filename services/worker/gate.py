"""The run slots of a worker, shared by both lanes. No I/O: only asyncio futures.

``slots`` deliveries of either lane run at once, and ``reserved`` more of the high lane
only: a high-lane delivery finds a slot at once while fewer than ``reserved`` of them
run, however busy the normal lane keeps the worker. Beyond those, high-lane deliveries
take normal slots, first: a freed slot goes to the oldest high-lane delivery waiting,
else to the oldest normal one that fits."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class GateClosed(Exception):
    """The worker is draining: a delivery still waiting for a slot is handed back."""


class Gate:
    def __init__(self, slots: int, reserved: int = 0) -> None:
        if slots < 1 or reserved < 0:
            raise ValueError("a gate needs at least one slot, and no negative reserve")
        self._slots = slots
        self._capacity = slots + reserved
        self._running = 0
        self._running_normal = 0
        # Waiting deliveries, oldest first: the high lane's, then the normal lane's.
        self._high: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._high) + len(self._normal)

    def _fits(self, high: bool) -> bool:
        # A normal delivery never takes the reserve: at most ``slots`` of them run.
        return self._running < self._capacity and (high or self._running_normal < self._slots)

    def _take(self, high: bool) -> None:
        self._running += 1
        if not high:
            self._running_normal += 1

    def try_enter(self, high: bool) -> bool:
        """Take a slot nobody ahead waits for, if one fits: the fast path, the usual one
        below full load (no coroutine, no future). Raises GateClosed once closed."""
        if self._closed:
            raise GateClosed
        ahead = self._high if high else self._high or self._normal
        if not ahead and self._fits(high):
            self._take(high)
            return True
        return False

    async def enter(self, high: bool) -> None:
        """Take a slot, waiting for one if need be (a high-lane delivery before any
        normal one). Raises GateClosed once the gate is closed. Cancelled while waiting,
        it takes no slot; cancelled just after a slot was given to it, it passes the
        slot on."""
        if self.try_enter(high):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane = self._high if high else self._normal
        lane.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.leave(high)  # given a slot in the same turn as cancelled: pass it on
            else:
                self._discard(lane, waiter)
            raise

    def leave(self, high: bool) -> None:
        """Free a slot taken by a delivery of that lane; it goes straight to the next
        waiter that fits, if any."""
        self._running -= 1
        if not high:
            self._running_normal -= 1
        for lane, lane_high in ((self._high, True), (self._normal, False)):
            while lane and self._fits(lane_high):
                waiter = lane.popleft()
                if not waiter.done():
                    self._take(lane_high)
                    waiter.set_result(None)
                    return

    def close(self) -> None:
        """Refuse every waiting delivery and any later one (GateClosed); running ones keep
        their slots."""
        self._closed = True
        for lane in (self._high, self._normal):
            while lane:
                waiter = lane.popleft()
                if not waiter.done():
                    waiter.set_exception(GateClosed())

    @staticmethod
    def _discard(lane: deque[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
        # Already taken off by leave() or close(), or not.
        with contextlib.suppress(ValueError):
            lane.remove(waiter)
