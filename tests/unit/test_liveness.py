"""shared.liveness: a loop run by essential() beats through its context; /healthz's
report names one that has not beaten for longer than it may, and the watchdog of
shared.lifecycle stops the process for it. The clock is the test's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from shared.lifecycle import EXIT_FAILED, Stop, Watchdog, essential, run
from shared.liveness import MIN_STALE_S, STALE_PERIODS, Liveness, beat, stale_after


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
    its stop checking every 10 ms whose exits are recorded."""

    def __init__(self, unresponsive_s: float = 5.0) -> None:
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
            period_s=0.01,
            unresponsive_s=unresponsive_s,
            exit_now=self.exits.append,
        )

    async def _loop(self) -> None:
        await self.release.wait()

    async def aclose(self) -> None:
        self.watchdog.close()
        self.release.set()
        self.stop.set()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def hung() -> AsyncIterator[Callable[..., Hung]]:
    made: list[Hung] = []

    def make(**kwargs: float) -> Hung:
        made.append(Hung(**kwargs))
        made[-1].watchdog.start()
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


async def test_the_watchdog_fails_the_stop_at_a_hung_loop(hung: Callable[..., Hung]) -> None:
    h = hung()
    h.clock.now += 10  # not yet more than it may
    await asyncio.sleep(0.1)
    assert not h.stop.is_set()
    h.clock.now += 0.5
    await asyncio.wait_for(h.stop.wait(), 5)
    assert h.stop.failure == "stuck hung: no turn within its bound (shared.liveness)"
    assert h.stop.hurry.is_set()  # as any failure: no stop delay
    assert h.exits == []  # the event loop took it: the process drains
    # ... and the hung loop is cancelled, or the drain would wait for it for ever.
    await asyncio.wait({h.task}, timeout=5)
    assert h.task.cancelled()
    assert h.stop.failure.startswith("stuck hung")  # its cancel is no second failure


async def test_the_watchdog_ends_a_process_whose_event_loop_is_held(
    hung: Callable[..., Hung],
) -> None:
    h = hung(unresponsive_s=0.2)
    h.clock.now += 11
    time.sleep(1.0)  # noqa: ASYNC251 - code that never awaits holds the event loop
    assert h.exits == [
        "stuck hung: no turn within its bound (shared.liveness); the event loop did not take"
        " the stop within 0.2s (held by code that never awaits): exiting"
    ]


async def test_the_watchdog_stands_down_once_the_process_stops(hung: Callable[..., Hung]) -> None:
    h = hung()
    h.stop.set()  # a drain is under way: its own bounds apply
    h.clock.now += 60
    await asyncio.sleep(0.1)
    assert h.stop.failure is None and h.exits == []
    assert not h.watchdog._thread.is_alive()


def test_run_stops_a_process_whose_loop_hangs(capsys: pytest.CaptureFixture[str]) -> None:
    """run()'s own watchdog, on the real clock: the loop's bound is 0.2 s."""
    drained: list[str] = []

    async def main(stop: Stop) -> None:
        async def stuck() -> None:
            beat()
            await asyncio.Event().wait()

        task = essential(stuck(), "stuck", stop, liveness=Liveness(), within=0.2)
        await stop.wait()
        await asyncio.wait({task})  # ended by the watchdog's cancel, not by release
        drained.append("drained")

    assert run("svc", main) == EXIT_FAILED
    assert drained == ["drained"]
    err = capsys.readouterr().err
    assert err.endswith(
        "svc: stopped after a failure: stuck hung: no turn within its bound (shared.liveness)\n"
    ), err
