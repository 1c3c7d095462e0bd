"""What the machine charges for waking up: the same small piece of Python work, timed
back to back and after a sleep.

A process of the system that handles one message and sleeps until the next one runs
its code with cold caches (and, on a virtual machine, on a vCPU the host may have put
to sleep). Where that costs several times the warm price, the CPU per task rises as
the offered rate falls, and "half the saturation rate" can be a full machine. The
figure makes the half-rate latencies of one machine comparable with another's."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

_SAMPLE = {"id": "0193a8c2-7e4f-7000-8000-000000000000", "state": "running", "seq": 3}


def _work() -> None:
    """About what a service does for one message: encode, decode, a few dict lookups."""
    for _ in range(4):
        decoded = json.loads(json.dumps({**_SAMPLE, "data": list(range(20))}))
        _ = decoded["state"], decoded["seq"], len(decoded["data"])


def _cpu_us(sleep_s: float, n: int) -> float:
    """Median thread CPU of one ``_work()`` in µs, each after ``sleep_s`` of sleep."""
    samples = []
    for _ in range(n):
        if sleep_s:
            time.sleep(sleep_s)
        t = time.thread_time_ns()
        _work()
        samples.append((time.thread_time_ns() - t) / 1e3)
    return statistics.median(samples)


def wake_cost(n: int = 200, sleep_s: float = 0.005) -> dict[str, Any]:
    """The work's CPU back to back and after ``sleep_s`` of sleep; ``ratio`` is the
    factor a message pays for finding its process asleep."""
    _cpu_us(0, 20)  # warm up the code itself
    warm = _cpu_us(0, n)
    cold = _cpu_us(sleep_s, n)
    return {
        "work_us_back_to_back": round(warm, 1),
        f"work_us_after_{int(sleep_s * 1000)}ms_sleep": round(cold, 1),
        "ratio": round(cold / warm, 2),
    }
