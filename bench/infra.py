"""The benchmark's private deployment: a namespace, a database, a tenant, service
processes, CPU accounting, and the cleanup that leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import psutil
from redis.asyncio import Redis

from shared import keys
from shared.db import migrate
from shared.decommission import delete_amqp, drop_database, unlink_keys
from shared.ids import uuid7
from shared.wire import Wire

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, as the services run (the load
    generator's CPU is part of every figure), else on asyncio's loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def cancel_on_signals() -> None:
    """SIGTERM and SIGINT cancel the running task (a run's main): its cleanup (the
    processes, the namespace, the database) still runs, where a signal's default would
    leave them behind."""
    me = asyncio.current_task()
    assert me is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, me.cancel)


async def to_the_end(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` (a run's cleanup) as a task of its own, to its end. Awaited in the
    run's task, cancelled by a signal, the cleanup's database connect raised
    CancelledError itself (seen: a SIGTERM'd ``bench.drain`` left its namespace). A
    second signal meanwhile is ignored."""
    task = asyncio.create_task(coro, name="cleanup")
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
AMQP_URL = os.environ.get("LONGHAUL_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("LONGHAUL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get(
    "LONGHAUL_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def raise_fd_limit() -> int:
    """Soft fd limit up to the hard one: 10,000 sockets need it (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# Loaded here, not in the forked child: the child must import nothing before exec.
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Proc:
    """One child process (a service, a peer worker, a load-generator helper) with its
    output kept in the run's log folder."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        name: str,
        log_dir: Path,
        *,
        stdin: bool = False,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{secrets.token_hex(2)}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            # Linux: the child gets SIGTERM if the benchmark dies, so a killed run
            # leaves no worker or client behind.
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one libc call, no lock taken
            env={**os.environ, **env},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_s(self) -> float:
        """CPU seconds of the process and its live children (0 once it exited)."""
        total = 0.0
        try:
            for p in [self.ps, *self.ps.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            pass
        return total

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, wait: float = 20.0, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return int(self.proc.returncode)


async def wait_http_ok(url: str, proc: Proc | None = None, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {within}s")


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


class CpuMeter:
    """CPU seconds used over an interval by this process (the load generator), its
    helper processes, and the named service processes; and how busy the whole machine
    was (PostgreSQL, RabbitMQ and Redis included), which says whether a latency was
    measured on a machine with room to spare."""

    def __init__(self, services: Mapping[str, Proc], helpers: list[Proc] | None = None) -> None:
        self._services = dict(services)
        self._helpers = helpers or []
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self._machine = (0, 0)

    def _now(self) -> dict[str, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        out = {"generator": me.ru_utime + me.ru_stime}
        out["generator"] += sum(h.cpu_s() for h in self._helpers)
        for name, proc in self._services.items():
            out[name] = proc.cpu_s()
        return out

    def start(self) -> None:
        self._start = self._now()
        self._t0 = time.monotonic()
        self._machine = _machine_jiffies()

    def add_helper_cpu(self, seconds: float) -> None:
        """CPU of helpers that already exited, reported by themselves."""
        self._start["generator"] = self._start.get("generator", 0.0) - seconds

    def stop(self) -> dict[str, float]:
        """Percent of the whole machine (all cores) per party over the interval."""
        wall = time.monotonic() - self._t0
        end = self._now()
        ncpu = os.cpu_count() or 1
        (busy_now, total_now), (busy_then, total_then) = _machine_jiffies(), self._machine
        busy, total = busy_now - busy_then, total_now - total_then
        return {
            **{
                f"{name}_cpu_pct": round(
                    100 * (end[name] - self._start.get(name, 0.0)) / (wall * ncpu), 1
                )
                for name in end
            },
            "machine_cpu_pct": round(100 * busy / max(1, total), 1),
        }


@dataclass
class BenchEnv:
    """The run's private names, database and tenant; ``close()`` removes all of it."""

    namespace: str = field(default_factory=lambda: f"lhbench_{secrets.token_hex(4)}")
    amqp_url: str = AMQP_URL
    redis_url: str = REDIS_URL
    tenant_id: Any = None
    api_key: str = ""
    extra_queues: list[str] = field(default_factory=list)
    extra_exchanges: list[str] = field(default_factory=list)
    extra_key_prefixes: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    # Finished tasks loaded before the run (see _seed_history).
    history: int = 50_000

    @property
    def database_url(self) -> str:
        return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + self.namespace

    @property
    def wire(self) -> Wire:
        return Wire(self.namespace)

    @property
    def log_dir(self) -> Path:
        return RESULTS / "logs" / self.namespace

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "LONGHAUL_NAMESPACE": self.namespace,
            "LONGHAUL_DATABASE_URL": self.database_url,
            "LONGHAUL_AMQP_URL": self.amqp_url,
            "LONGHAUL_REDIS_URL": self.redis_url,
            "LONGHAUL_START_TIMEOUT_S": "30",
        }
        base.update({f"LONGHAUL_{k.upper()}": v for k, v in extra.items()})
        return base

    async def open(self) -> None:
        await migrate(self.database_url, timeout=30)
        conn = await asyncpg.connect(self.database_url)
        try:
            new = keys.generate("bench")
            self.tenant_id = uuid7()
            # No per-tenant limit: the API runs with LONGHAUL_RATE_LIMIT_PER_S=0, which
            # then skips the limiter (a tenant limit, even a huge one, would still cost
            # a Redis round trip per request).
            await conn.execute(
                "INSERT INTO tenants (id, name) VALUES ($1, $2)",
                self.tenant_id,
                f"bench-{self.namespace}",
            )
            await conn.execute(
                "INSERT INTO api_keys (key_id, tenant_id, label, secret_hash) "
                "VALUES ($1, $2, $3, $4)",
                new.key_id,
                self.tenant_id,
                new.label,
                new.secret_hash,
            )
            self.api_key = new.key
            await self._seed_history(conn)
        finally:
            await conn.close()

    async def _seed_history(self, conn: asyncpg.Connection) -> None:
        """Load finished tasks of another tenant, then VACUUM ANALYZE (as ``pgbench -i``
        does): the system is measured in service, not in the first minute after
        ``CREATE TABLE``, when its prepared statements would be planned for an empty
        table and keep those plans until autovacuum's first ANALYZE."""
        if not self.history:
            return
        other = uuid7()
        await conn.execute(
            "INSERT INTO tenants (id, name) VALUES ($1, $2)", other, f"history-{self.namespace}"
        )
        await conn.execute(
            """
            INSERT INTO tasks (id, tenant_id, type, args, state, progress, result,
                               attempts, max_attempts, priority, timeout_s, last_seq,
                               started_at, finished_at)
            SELECT gen_random_uuid(), $1, 'demo.noop', '{}', 'succeeded', 1, 'null', 1, 3,
                   0, 60, 3, now(), now()
            FROM generate_series(1, $2)
            """,
            other,
            self.history,
        )
        await conn.execute("VACUUM ANALYZE")

    def spawn(
        self,
        argv: list[str],
        name: str,
        env: Mapping[str, str] | None = None,
        *,
        stdin: bool = False,
        stdout_pipe: bool = False,
    ) -> Proc:
        proc = Proc(argv, env or {}, name, self.log_dir, stdin=stdin, stdout_pipe=stdout_pipe)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()

    async def close(self) -> None:
        self.stop_all()
        with contextlib.suppress(Exception):
            await drop_database(PG_ADMIN_URL, self.namespace, force=True, timeout=30)
        redis = Redis.from_url(self.redis_url)
        try:
            for prefix in [self.wire.redis_prefix, *self.extra_key_prefixes]:
                await unlink_keys(redis, prefix)
        finally:
            await redis.aclose()
        await delete_amqp(
            self.amqp_url,
            [*self.wire.queues, *self.extra_queues],
            [*self.wire.exchanges, *self.extra_exchanges],
            timeout=10,
            force=True,
        )


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
