"""The peers' client: ``python -m bench.peer_client celery|dramatiq N THREADS``.

Submits N no-op tasks from THREADS threads (each thread its own broker channel), then
waits for completion: Celery safe waits for every result (``ResultSet.join_native``),
the others watch the completion counter. Prints one JSON line."""

from __future__ import annotations

import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import redis

from bench.peer_common import COUNTER_KEY, REDIS_URL, SAFE


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    which, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 300.0
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(COUNTER_KEY)
    if which == "celery":
        from bench.peer_celery import noop  # noqa: PLC0415 - one peer per process

        def submit(k: int) -> list[Any]:
            return [noop.apply_async() for _ in range(k)]

        def wait(part: list[Any]) -> int:
            from celery.result import ResultSet  # noqa: PLC0415

            # join() (one get() per result) rather than join_native(), which is
            # several times slower with the Redis backend on this machine.
            values = ResultSet(part).join(timeout=timeout)
            return sum(1 for v in values if v == {"ok": True})
    else:
        from bench.peer_dramatiq import broker, noop  # noqa: PLC0415

        broker.declare_queue(noop.queue_name)

        def submit(k: int) -> list[Any]:
            for _ in range(k):
                noop.send()
            return []

    cpu0 = _cpu()
    shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    t0 = time.time()
    parts: list[list[Any]] = []
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(submit, shares))
        t_submitted = time.time()
        if which == "celery" and SAFE:
            # Each thread waits for the results of what it submitted.
            done = sum(pool.map(wait, parts))
    if not (which == "celery" and SAFE):
        done = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = int(r.get(COUNTER_KEY) or 0)
            if done >= n:
                break
            time.sleep(0.005)
    t_done = time.time()
    out = {
        "n": n,
        "done": done,
        "t0": t0,
        "t_submitted": t_submitted,
        "t_done": t_done,
        "cpu_s": round(_cpu() - cpu0, 3),  # the run only, not the imports
    }
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
