"""The load generator's method: pure parts of the benchmark, checked without services."""

from __future__ import annotations

import time

from bench.longhaul import open_loop


async def test_an_open_loop_times_each_request_from_when_it_was_due() -> None:
    # The first request blocks the generator for 100 ms: the ones due meanwhile start
    # late, and their latency must include that wait (no coordinated omission).
    stamps: list[float] = []
    started: list[float] = []

    async def submit(due: float) -> None:
        stamps.append(due)
        started.append(time.time())
        if len(stamps) == 1:
            time.sleep(0.1)  # noqa: ASYNC251 - a busy generator, not a slow server

    t0 = time.time()
    late = await open_loop(submit, requests=10, interval=0.01, t0=t0)
    assert stamps == [t0 + i * 0.01 for i in range(10)]
    assert started[1] - stamps[1] > 0.05  # it did start late, and is timed from when due
    assert late >= 3
