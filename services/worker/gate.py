"""The run slots of a worker, shared by both lanes: at most ``slots`` deliveries run at
once, and a freed slot goes to the oldest high-lane delivery waiting, else to the oldest
normal one. No I/O: only asyncio futures."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class GateClosed(Exception):
    """The worker is draining: a delivery still waiting for a slot is handed back."""


class Gate:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self._free = slots
        # Waiting deliveries, oldest first: the high lane's, then the normal lane's.
        self._high: deque[asyncio.Future[None]] = deque()
        self._normal: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._high) + len(self._normal)

    def try_enter(self) -> bool:
        """Take a free slot nobody waits for, if there is one: the fast path, the usual
        one below full load (no coroutine, no future). Raises GateClosed once closed."""
        if self._closed:
            raise GateClosed
        if self._free and not self._high and not self._normal:
            self._free -= 1
            return True
        return False

    async def enter(self, high: bool) -> None:
        """Take a slot, waiting for one if need be (a high-lane delivery before any
        normal one). Raises GateClosed once the gate is closed. Cancelled while waiting,
        it takes no slot; cancelled just after a slot was given to it, it passes the
        slot on."""
        if self.try_enter():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane = self._high if high else self._normal
        lane.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.leave()  # given a slot in the same turn as cancelled: pass it on
            else:
                self._discard(lane, waiter)
            raise

    def leave(self) -> None:
        """Free a slot taken by ``enter``: straight to the next waiter, if any."""
        for lane in (self._high, self._normal):
            while lane:
                waiter = lane.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._free += 1

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
