"""The peers' client: ``python -m bench.peer_client celery|dramatiq N THREADS [TIMEOUT]``.

Submits N no-op tasks from THREADS threads, each with its own broker connection and
channel opened before the clock starts: with publisher confirms a thread has one
publish in flight, so THREADS is the number of publishes in flight, set to the number
of requests Longhaul's generator has in flight at saturation. Then waits for
completion: Celery safe waits for every result (each thread for its own, with
``ResultSet.join``), the others watch the completion counter. Prints one JSON line."""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis

from bench.peer_common import COUNTER_KEY, REDIS_URL, SAFE


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peer(
    which: str, timeout: float
) -> tuple[
    Callable[[], contextlib.AbstractContextManager[Any]],
    Callable[[Any, int], list[Any]],
    Callable[[list[Any]], int] | None,
]:
    """(open: a thread's connection, as a context; submit(connection, k); wait(results)
    or None where completion is counted by the counter)."""
    if which == "celery":
        from bench.peer_celery import app, noop  # noqa: PLC0415 - one peer per process

        @contextlib.contextmanager
        def open_celery() -> Any:
            # The thread's own producer (connection + channel) for the whole run: the
            # pool would otherwise hand one out per publish.
            with app.producer_or_acquire() as producer:
                producer.connection.ensure_connection(max_retries=3)
                _ = producer.connection.default_channel  # the producer's, opened now
                yield producer

        def submit_celery(producer: Any, k: int) -> list[Any]:
            return [noop.apply_async(producer=producer) for _ in range(k)]

        def wait(part: list[Any]) -> int:
            from celery.result import ResultSet  # noqa: PLC0415

            # join() (one get() per result) rather than join_native(), which is
            # several times slower with the Redis backend on this machine.
            values = ResultSet(part).join(timeout=timeout)
            return sum(1 for v in values if v == {"ok": True})

        return open_celery, submit_celery, wait if SAFE else None

    from bench.peer_dramatiq import broker, noop  # noqa: PLC0415

    broker.declare_queue(noop.queue_name)

    @contextlib.contextmanager
    def open_dramatiq() -> Any:
        # Dramatiq's connection and channel are per thread (thread-local): open them.
        yield broker.channel

    def submit_dramatiq(_: Any, k: int) -> list[Any]:
        for _ in range(k):
            noop.send()
        return []

    return open_dramatiq, submit_dramatiq, None


def main() -> int:
    which, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 300.0
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(COUNTER_KEY)
    open_conn, submit, wait = _peer(which, timeout)
    shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    ready = threading.Barrier(threads + 1, timeout=120)
    submitted = [0.0] * threads
    done_by = [0] * threads
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            with open_conn() as conn:
                ready.wait()
                part = submit(conn, shares[i])
                submitted[i] = time.time()
            if wait is not None:
                done_by[i] = wait(part)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            ready.abort()

    workers = [threading.Thread(target=body, args=(i,), name=f"submit-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a thread failed: below
        ready.wait()  # every thread has its connection
    cpu0 = _cpu()
    t0 = time.time()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    t_submitted = max(submitted)
    if wait is not None:
        done = sum(done_by)
    else:
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
        "cpu_s": round(_cpu() - cpu0, 3),  # the run only, not the imports and connects
    }
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
