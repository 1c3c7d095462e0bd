"""What the machine charges for waking up: the same small piece of Python work, timed
back to back and after a sleep; and a message to another process and back, with the
two on any CPU and on one.

A process of the system that handles one message and sleeps until the next one runs
its code with cold caches (and, on a virtual machine, on a vCPU the host may have put
to sleep). Where that costs several times the warm price, the CPU per task rises as
the offered rate falls, and "half the saturation rate" can be a full machine. The
figure makes the half-rate latencies of one machine comparable with another's."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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


# The other end of ``round_trip``: answers each byte with one, then prints its CPU.
_ECHO = """
import os, sys, time
n = int(sys.argv[1])
os.write(1, b"r")
t = time.process_time()
for _ in range(n):
    os.read(0, 1)
    os.write(1, b"x")
os.write(1, repr(time.process_time() - t).encode())
"""


def round_trip(n: int = 5000, cpus: set[int] | None = None) -> dict[str, float]:
    """A byte to another process and back over pipes, ``n`` times, each side asleep
    until the other writes: what a message between two services costs below
    saturation, apart from any work. ``cpus``: both processes kept on these CPUs (one
    CPU: no wake-up crosses to another; on a virtual machine such a wake-up can cost
    the host's interrupt to a sleeping vCPU)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    mine = os.sched_getaffinity(0)
    out, into = child.stdout.fileno(), child.stdin.fileno()
    try:
        if cpus is not None:
            os.sched_setaffinity(child.pid, cpus)
            os.sched_setaffinity(0, cpus)
        os.read(out, 1)  # the child is ready
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            os.write(into, b"x")
            os.read(out, 1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        child.stdin.close()
        child_cpu = float(child.stdout.read() or b"0")
    finally:
        os.sched_setaffinity(0, mine)
        if child.poll() is None:
            child.kill()
        child.wait()
    return {
        "round_trip_us": round(wall / n * 1e6, 1),
        "cpu_us_per_round_trip": round((cpu + child_cpu) / n * 1e6, 1),
    }
