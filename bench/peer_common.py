"""What the peer apps share: their settings from env vars, and a completion counter.

The counter is the benchmark's side channel where a configuration keeps no results:
each worker process adds its completed tasks to one Redis key every 20 ms (one INCRBY
per flush, not per task), so knowing completion costs the peer almost nothing."""

from __future__ import annotations

import atexit
import os
import threading

import redis

QUEUE = os.environ.get("BENCH_PEER_QUEUE", "lhbench_peer")
SAFE = os.environ.get("BENCH_PEER_MODE", "safe") == "safe"
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_PEER_PREFIX", "lhbench_peer:")
COUNTER_KEY = f"{PREFIX}done"


class Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._stop = threading.Event()

    def hit(self) -> None:
        with self._lock:
            self._n += 1
            if self._thread is None:
                self._client = redis.Redis.from_url(REDIS_URL)
                self._thread = threading.Thread(target=self._loop, daemon=True)
                self._thread.start()
                atexit.register(self._flush)

    def _flush(self) -> None:
        with self._lock:
            n, self._n = self._n, 0
        if n and self._client is not None:
            self._client.incrby(COUNTER_KEY, n)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self._flush()


COUNTER = Counter()
