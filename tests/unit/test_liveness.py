"""shared.liveness: a loop run by essential() beats through its context; /healthz's
report names one that has not beaten for longer than it may. The clock is the test's."""

from __future__ import annotations

import asyncio

from shared.lifecycle import Stop, essential
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
        assert not stop.is_set()  # a hang is for /healthz, not a failure of the process
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
