"""The worker's run-slot gate: high lane first, FIFO within a lane, never more than its
slots, and cancelled or refused waiters that neither take nor hold a slot."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from services.worker.gate import Gate, GateClosed


class _Log:
    """Deliveries that enter a gate and record when they got their slot."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.order: list[str] = []
        self.running = 0
        self.most = 0

    async def run(self, name: str, high: bool, release: asyncio.Event) -> None:
        await self.gate.enter(high)
        self.order.append(name)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await release.wait()
        finally:
            self.running -= 1
            self.gate.leave(high)


def _at_once(entering: Coroutine[Any, Any, None]) -> None:
    """Run ``entering`` and require that it finished without waiting once."""
    try:
        entering.send(None)
    except StopIteration:
        return
    entering.close()
    raise AssertionError("waited for a slot")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_free_slot_is_taken_at_once() -> None:
    """Below full load a delivery enters without waiting (no future, no turn of the loop)."""
    gate = Gate(2)
    _at_once(gate.enter(high=False))  # done without yielding
    _at_once(gate.enter(high=True))
    assert gate.waiting == 0
    gate.leave(False)
    gate.leave(True)


async def test_waiting_high_deliveries_start_first_and_each_lane_in_order() -> None:
    """With every slot taken, freed slots go to the waiting high-lane deliveries in their
    arrival order, then to the normal ones in theirs, however they arrived."""
    gate = Gate(1)
    log = _Log(gate)
    release = asyncio.Event()
    first = asyncio.create_task(log.run("busy", False, asyncio.Event()))
    await _settle()
    tasks = [
        asyncio.create_task(log.run(name, high, release))
        for name, high in [("n1", False), ("h1", True), ("n2", False), ("h2", True), ("n3", False)]
    ]
    await _settle()
    assert gate.waiting == 5 and log.order == ["busy"]
    release.set()
    first.cancel()  # frees the slot: the chain of releases starts
    await asyncio.gather(*tasks)
    assert log.order == ["busy", "h1", "h2", "n1", "n2", "n3"]
    assert log.most == 1


async def test_never_more_than_its_slots_run() -> None:
    """Many deliveries of both lanes through a gate of 3: at most 3 at once, all run."""
    gate = Gate(3)
    log = _Log(gate)
    release = asyncio.Event()
    tasks = [asyncio.create_task(log.run(f"t{i}", i % 2 == 0, release)) for i in range(20)]
    await _settle()
    assert log.running == 3 and gate.waiting == 17
    release.set()
    await asyncio.gather(*tasks)
    assert len(log.order) == 20 and log.most == 3 and log.running == 0


async def test_a_cancelled_waiter_frees_nothing_and_blocks_nothing() -> None:
    """A waiter cancelled before its turn leaves no slot behind (the count stays) and does
    not hold up the waiters after it."""
    gate = Gate(1)
    log = _Log(gate)
    hold, release = asyncio.Event(), asyncio.Event()
    busy = asyncio.create_task(log.run("busy", False, hold))
    await _settle()
    gone = asyncio.create_task(log.run("gone", True, release))
    after = asyncio.create_task(log.run("after", False, release))
    await _settle()
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert gate.waiting == 1 and log.order == ["busy"]
    hold.set()
    release.set()
    await asyncio.gather(busy, after)
    assert log.order == ["busy", "after"] and log.most == 1
    # One slot, free again: exactly one enters at once, the next waits.
    _at_once(gate.enter(high=False))
    second = asyncio.create_task(gate.enter(high=False))
    await _settle()
    assert not second.done()
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    gate.leave(False)


async def test_a_waiter_cancelled_as_it_is_given_a_slot_passes_it_on() -> None:
    """Given the slot and cancelled in the same turn, a waiter hands the slot to the next
    one instead of keeping it."""
    gate = Gate(1)
    await gate.enter(high=False)
    unlucky = asyncio.create_task(gate.enter(high=True))
    next_one = asyncio.create_task(gate.enter(high=False))
    await _settle()
    gate.leave(False)  # the slot goes to unlucky...
    unlucky.cancel()  # ...which is cancelled before it resumes
    await asyncio.gather(unlucky, return_exceptions=True)
    await asyncio.wait_for(next_one, 1)
    assert gate.waiting == 0
    gate.leave(False)
    _at_once(gate.enter(high=False))  # exactly one slot, free


async def test_closing_refuses_the_waiters_and_later_ones_but_not_the_running() -> None:
    """A draining worker closes its gate: waiting deliveries are refused (handed back),
    so are later ones, and the running one keeps its slot."""
    gate = Gate(1)
    await gate.enter(high=False)
    waiters = [asyncio.create_task(gate.enter(high=h)) for h in (True, False)]
    await _settle()
    gate.close()
    for waiter in waiters:
        with pytest.raises(GateClosed):
            await waiter
    with pytest.raises(GateClosed):
        await gate.enter(high=True)
    assert gate.waiting == 0
    gate.leave(False)


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        Gate(0)
    with pytest.raises(ValueError):
        Gate(1, reserved=-1)


def test_the_fast_path_takes_only_a_slot_nobody_waits_for() -> None:
    """try_enter takes a free slot, and nothing once they are all taken."""
    gate = Gate(1)
    assert gate.try_enter(False) and not gate.try_enter(False) and not gate.try_enter(True)
    gate.leave(False)
    assert gate.try_enter(True)


async def test_the_reserve_starts_high_deliveries_however_busy_the_normal_lane() -> None:
    """With every shared slot taken by normal deliveries and more of them waiting, a
    high-lane delivery still starts at once in a reserved slot, and so does one more
    while the reserve lasts; past it, it waits, first in line."""
    gate = Gate(2, reserved=2)
    log = _Log(gate)
    hold = asyncio.Event()
    normal = [asyncio.create_task(log.run(f"n{i}", False, hold)) for i in range(3)]
    await _settle()
    assert log.order == ["n0", "n1"] and gate.waiting == 1
    _at_once(gate.enter(high=True))
    _at_once(gate.enter(high=True))
    third = asyncio.create_task(log.run("h3", True, hold))
    await _settle()
    assert gate.waiting == 2 and "h3" not in log.order
    gate.leave(True)  # a reserved slot back: the waiting high delivery takes it
    await _settle()
    assert log.order[-1] == "h3" and gate.waiting == 1
    gate.leave(True)  # the reserve is not for normal deliveries: n2 still waits
    await _settle()
    assert "n2" not in log.order and gate.waiting == 1
    hold.set()
    await asyncio.gather(*normal, third)
    assert log.order[-1] == "n2" and log.most == 3


async def test_high_deliveries_past_the_reserve_take_shared_slots_first() -> None:
    """High-lane deliveries use the shared slots too, and a freed one goes to a waiting
    high delivery before a normal one; normal ones never run more than the shared
    slots."""
    gate = Gate(1, reserved=1)
    log = _Log(gate)
    hold, release = asyncio.Event(), asyncio.Event()
    busy = [asyncio.create_task(log.run(f"h{i}", True, hold)) for i in range(2)]
    await _settle()
    assert log.order == ["h0", "h1"]  # the shared slot and the reserved one
    waiting = [
        asyncio.create_task(log.run(name, high, release))
        for name, high in [("n0", False), ("h2", True), ("n1", False)]
    ]
    await _settle()
    assert gate.waiting == 3
    hold.set()
    release.set()
    await asyncio.gather(*busy, *waiting)
    assert log.order[2:] == ["h2", "n0", "n1"]
    assert log.most == 2
