"""shared.liveness: a loop run by essential() beats through its context; /healthz's
report names one that has not beaten for longer than it may, and the watchdog of
shared.lifecycle stops the process for it. The clock is the test's."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shared.lifecycle import Stop, Watchdog, essential
from shared.liveness import MIN_STALE_S, STALE_PERIODS, Liveness, beat, stale_after
from tests.support import eventually, until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_loop_that_stops_beating_is_named_until_it_ends() -> None:
    clock = Clock()
    liveness = Liveness(clock)
    turn, hang, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def loop() -> None:
        while not hang.is_set():
            beat()
            await turn.wait()
            turn.clear()
        await done.wait()  # stuck on an await: alive to essential(), doing nothing

    async def idle() -> None:
        while True:
            beat()
            await asyncio.sleep(0)

    stop = Stop()
    stuck = essential(loop(), "stuck", stop, liveness=liveness, within=10)
    busy = essential(idle(), "busy", stop, liveness=liveness, within=10)
    try:
        await asyncio.sleep(0)
        clock.now += 9
        turn.set()
        await asyncio.sleep(0.01)
        assert liveness.report() == (True, {"status": "ok", "loops": {"busy": 0, "stuck": 0}})
        hang.set()
        turn.set()
        await asyncio.sleep(0.01)
        clock.now += 10  # not yet more than it may
        assert liveness.stale() == []
        clock.now += 0.5
        await asyncio.sleep(0.01)  # the busy loop beats on
        ok, body = liveness.report()
        assert (ok, body["status"], body["stale"]) == (False, "hung", ["stuck"])
        assert body["loops"] == {"busy": 0, "stuck": 10.5}
        assert not stop.is_set()  # essential() leaves a hang to the watchdog (run())
        done.set()
        await stuck  # it ended (a stop drained it): no longer watched
        assert liveness.report()[0] and list(liveness.report()[1]["loops"]) == ["busy"]
    finally:
        stop.set()  # what ends now ended as asked
        busy.cancel()
        await asyncio.gather(stuck, busy, return_exceptions=True)


async def test_a_beat_outside_a_watched_loop_is_no_op() -> None:
    beat()  # a loop a test runs by itself
    liveness = Liveness(Clock())
    task = essential(asyncio.sleep(0), "plain", None)  # no liveness: watched by nobody
    await task
    assert liveness.report() == (True, {"status": "ok", "loops": {}})


def test_stale_after_is_several_periods_of_waits_and_calls() -> None:
    assert stale_after(10, 5, calls=2) == STALE_PERIODS * 20
    assert stale_after(1.5, 0) == MIN_STALE_S


class Hung:
    """An essential loop that waits on ``release`` from its start (which counts as its
    first beat), watched within 10 s by a Liveness on the test's clock, and a watchdog of
    its stop checking every 10 ms whose exits are recorded. ``paused``: the watchdog
    reads the same clock, so a jump of it is a pause of the whole process."""

    def __init__(
        self, unresponsive_s: float = 5.0, paused: bool = False, drain_s: float | None = None
    ) -> None:
        self.clock = Clock()
        self.stop = Stop()
        self.release = asyncio.Event()
        self.exits: list[str] = []
        self.task = essential(
            self._loop(), "stuck", self.stop, liveness=Liveness(self.clock), within=10
        )
        self.watchdog = Watchdog(
            self.stop,
            asyncio.get_running_loop(),
            drain_s=drain_s,
            period_s=0.01,
            unresponsive_s=unresponsive_s,
            exit_now=self.exits.append,
            clock=self.clock if paused else time.monotonic,
        )

    async def _loop(self) -> None:
        await self.release.wait()

    def held(self, within: float = 5) -> None:
        """Hold the event loop (code that never awaits) until an exit is recorded."""
        deadline = time.monotonic() + within
        while not self.exits and time.monotonic() < deadline:
            time.sleep(0.01)  # the point: the event loop is held

    async def aclose(self) -> None:
        self.watchdog.close()
        self.release.set()
        self.stop.set()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def hung() -> AsyncIterator[Callable[..., Hung]]:
    made: list[Hung] = []

    def make(**kwargs: Any) -> Hung:
        made.append(Hung(**kwargs))
        made[-1].watchdog.start()
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


WHY = "stuck hung: no turn within its bound (shared.liveness)"


async def test_the_watchdog_fails_the_stop_at_a_hung_loop(hung: Callable[..., Hung]) -> None:
    h = hung()
    h.clock.now += 10  # not yet more than it may
    await asyncio.sleep(0.1)
    assert not h.stop.is_set()
    h.clock.now += 0.5
    await asyncio.wait_for(h.stop.wait(), 5)
    assert h.stop.failure == WHY
    assert h.stop.hurry.is_set()  # as any failure: no stop delay
    assert h.exits == []  # the event loop took it: the process drains
    # ... and the hung loop is cancelled, or the drain would wait for it for ever.
    await asyncio.wait({h.task}, timeout=5)
    assert h.task.cancelled()
    assert h.stop.failure == WHY  # its cancel is no second failure


async def test_the_watchdog_ends_a_process_whose_event_loop_is_held(
    hung: Callable[..., Hung],
) -> None:
    h = hung(unresponsive_s=0.2)
    h.clock.now += 11
    h.held()
    assert h.exits == [
        f"{WHY}; the event loop did not take the stop within 0.2s (held by code that never"
        " awaits): exiting"
    ]


async def test_a_held_event_loop_is_named_and_not_the_loops(hung: Callable[..., Hung]) -> None:
    """Held for over a second when the loop's bound ran out: the loop had no chance."""
    h = hung()
    late = threading.Timer(1.5, lambda: setattr(h.clock, "now", h.clock.now + 11))
    late.start()
    # Code that never awaits holds the event loop past the bound, and on for the
    # watchdog's next turns (whenever the timer's thread got to run).
    while not late.finished.is_set():
        time.sleep(0.01)  # noqa: ASYNC251
    time.sleep(0.5)  # noqa: ASYNC251
    await asyncio.wait_for(h.stop.wait(), 5)
    assert h.stop.failure is not None
    assert h.stop.failure.startswith("the event loop was held for "), h.stop.failure
    assert h.stop.failure.endswith(
        " (code that never awaits): stuck had no turn within its bound (shared.liveness)"
    )


async def test_a_pause_of_the_process_restarts_the_bounds(hung: Callable[..., Hung]) -> None:
    """SIGSTOP, `docker pause`: every clock jumps, and no loop had a turn meanwhile."""
    h = hung(paused=True)
    await asyncio.sleep(0.05)
    h.clock.now += 60
    await asyncio.sleep(0.1)
    assert not h.stop.is_set()
    for _ in range(21):  # 10.5 s more, in steps shorter than a pause
        h.clock.now += 0.5
        await asyncio.sleep(0.01)
    await asyncio.wait_for(h.stop.wait(), 5)
    assert h.stop.failure == WHY


async def test_a_signal_before_the_stop_is_taken_keeps_the_stop_a_stop(
    hung: Callable[..., Hung],
) -> None:
    """The hang seen, and a SIGTERM first on the event loop: its drain is no failure."""
    h = hung()
    h.clock.now += 11
    time.sleep(0.3)  # noqa: ASYNC251 - the watchdog asks meanwhile
    h.stop.signalled()
    await asyncio.sleep(0.1)  # the watchdog's callback runs now
    assert h.stop.is_set() and h.stop.failure is None and not h.stop.hurry.is_set()
    assert not h.task.done() and h.exits == []


async def test_the_watchdog_stands_down_once_the_process_stops(hung: Callable[..., Hung]) -> None:
    h = hung()
    h.stop.set()  # a drain is under way: its own bounds apply
    h.clock.now += 60
    h.watchdog._thread.join(5)
    assert not h.watchdog._thread.is_alive()
    assert h.stop.failure is None and h.exits == []


async def test_a_drain_after_a_hang_that_outlasts_its_bound_ends_the_process(
    hung: Callable[..., Hung],
) -> None:
    """The hung loop cancelled, the drain still not over (something ignores its cancel):
    after a failure no supervisor's stop timeout would end the process."""
    h = hung(drain_s=1)
    h.clock.now += 11
    await asyncio.wait_for(h.stop.wait(), 5)
    await asyncio.sleep(0.1)
    assert h.exits == []  # within its bound
    await eventually(until(lambda: h.exits), within=5, what="the drain's bound")
    assert h.exits == [
        f"the drain after a failure ({WHY}) did not end within 1s (something ignores its"
        " cancellation): exiting"
    ]


async def test_a_drain_after_a_signal_has_its_bound_too(hung: Callable[..., Hung]) -> None:
    h = hung(drain_s=0.3)
    h.stop.signalled()
    await eventually(until(lambda: h.exits), within=5, what="the drain's bound")
    assert h.exits == [
        "the drain did not end within 0.3s (something ignores its cancellation): exiting"
    ]


async def test_a_drain_that_ends_within_its_bound_ends_the_watching(
    hung: Callable[..., Hung],
) -> None:
    h = hung(drain_s=2)
    h.stop.signalled()
    await asyncio.sleep(0.1)
    h.watchdog.close()  # the event loop closed: the drain is over
    await asyncio.sleep(2.1)
    assert h.exits == [] and not h.watchdog._thread.is_alive()


async def test_a_pause_during_the_drain_restarts_its_bound(hung: Callable[..., Hung]) -> None:
    h = hung(paused=True, drain_s=2)
    h.stop.signalled()
    await asyncio.sleep(0.05)
    h.clock.now += 60  # paused (SIGSTOP) while draining
    await asyncio.sleep(0.1)
    assert h.exits == []
    h.clock.now += 2.5
    await eventually(until(lambda: h.exits), within=5, what="the drain's bound, from the pause")


async def test_what_is_left_once_main_returned_has_the_bound(hung: Callable[..., Hung]) -> None:
    """main returned without a stop (a failed start): the event loop's close, which
    waits for the tasks still running, is bounded all the same."""
    h = hung(drain_s=0.5)
    h.watchdog.returned()
    await eventually(until(lambda: h.exits), within=5, what="the drain's bound")
    assert h.exits == [
        "the drain did not end within 0.5s (something ignores its cancellation): exiting"
    ]
