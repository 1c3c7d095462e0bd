"""Test plumbing: unique names per run, service processes, waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# Slow machines set LONGHAUL_TEST_TIMEOUT_SCALE=3; nothing sleeps where it can wait.
SCALE = float(os.environ.get("LONGHAUL_TEST_TIMEOUT_SCALE", "1"))
T = TypeVar("T")


def timeout(seconds: float) -> float:
    return seconds * SCALE


# The operator command as installed beside the interpreter (.venv/bin/longhaul).
LONGHAUL_CLI = str(Path(sys.executable).parent / "longhaul")


async def run_cli(env: Mapping[str, str], *args: str) -> tuple[int, str, str]:
    """``longhaul ARGS`` in ``env``: its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        LONGHAUL_CLI,
        *args,
        cwd=ROOT,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout(60))
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# Ports free_port() handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now that this process has not handed out before. The services of a
    system get their ports before any of them binds, and the kernel may offer a port it
    just offered again: a worker's health server once took the gateway's port, and the
    gateway's readiness check was answered by the worker."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def new_run_id() -> str:
    return secrets.token_hex(4)


def until(condition: Callable[[], object]) -> Callable[[], Awaitable[bool]]:
    """An ``eventually`` check from a plain predicate."""

    async def check() -> bool:
        return bool(condition())

    return check


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    within: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``within`` (scaled)."""
    deadline = time.monotonic() + timeout(within)
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


async def watched_until(
    consumer: Any, check: Callable[[], Awaitable[object]], *, within: float, what: str
) -> None:
    """Run the worker consumer's watch, every 10 ms, until ``check`` holds (eventually);
    then stop it."""
    stop = asyncio.Event()
    watching = asyncio.create_task(consumer.watch(stop, interval_s=0.01))
    try:
        await eventually(check, within=within, interval=0.01, what=what)
    finally:
        stop.set()
        await watching


async def outbox_emptied(db: Any, ids: list[Any]) -> None:
    """The outbox holds none of these tasks' rows, soon: an API deletes the rows it
    published together, a moment after the broker confirmed them (so a task may end
    first)."""

    async def empty() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])", ids
        )
        return bool(count == 0)

    await eventually(empty, within=10, what="the published tasks' outbox rows deleted")


async def register_task_types(env: Mapping[str, str], *modules: str) -> None:
    """Start a worker (built-in types and ``modules``) until it is ready, then stop it:
    a worker registers its types at start, and the API admits only registered types."""
    port = free_port()
    args = [a for m in modules for a in ("--tasks", m)]
    worker = ServiceProcess(
        "services.worker",
        {**env, "LONGHAUL_WORKER_METRICS_PORT": str(port)},
        args,
        name="types-worker",
    )
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc=worker)
    finally:
        worker.terminate()


class ServiceProcess:
    """One service started as ``python -m services.<name>``, its stderr kept as an artifact."""

    def __init__(
        self,
        module: str,
        env: Mapping[str, str],
        args: list[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.module = module
        self.name = name or module.rsplit(".", 1)[-1]
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "logs").mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / "logs" / f"{self.name}-{secrets.token_hex(3)}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *(args or [])],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, wait: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout(wait))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return int(self.proc.returncode)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running(
    module: str, env: Mapping[str, str], args: list[str] | None = None, name: str | None = None
) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(module, env, args, name)
    try:
        yield proc
    finally:
        proc.terminate()


async def wait_http_ok(url: str, within: float = 30.0, proc: ServiceProcess | None = None) -> None:
    """Wait until ``url`` answers 200 (and fail early, with its log, if ``proc`` died)."""

    async def check() -> bool:
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"{proc.name} exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}"
            )
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    await eventually(check, within=within, interval=0.1, what=f"{url} to answer 200")


async def worker_metric(
    system: System, http: aiohttp.ClientSession, name: str, missing: float | None = None
) -> float:
    """A gauge or counter of the system's (first) worker, from its /metrics; ``name``
    with its labels as the exposition writes them (``x_total{type="a"}``). ``missing``:
    the value of a labelled series not yet written (else its absence fails)."""
    async with http.get(f"http://127.0.0.1:{system.metrics_port}/metrics") as r:
        text = await r.text()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    if match is None and missing is not None:
        return missing
    assert match, f"{name} not in the worker's metrics"
    return float(match[1])


class System:
    """api, worker(s) and optionally the gateway of one test, as real processes."""

    def __init__(self, env: Mapping[str, str], ports: Mapping[str, str] | None = None) -> None:
        """``ports``: api_port, gateway_port and worker_metrics_port; free ones if None."""
        if ports is None:
            ports = {
                "api_port": str(free_port()),
                "gateway_port": str(free_port()),
                "worker_metrics_port": str(free_port()),
            }
        self.env = dict(env)
        self.api_port = int(ports["api_port"])
        self.gateway_port = int(ports["gateway_port"])
        self.metrics_port = int(ports["worker_metrics_port"])
        self.procs: list[ServiceProcess] = []

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def start_api(self, **extra: str) -> ServiceProcess:
        env = {
            **self.env,
            "LONGHAUL_API_PORT": str(self.api_port),
            "LONGHAUL_PUBLIC_WS_URL": f"ws://127.0.0.1:{self.gateway_port}/v1/ws",
            **{f"LONGHAUL_{k.upper()}": v for k, v in extra.items()},
        }
        proc = ServiceProcess("services.api", env, name="api")
        self.procs.append(proc)
        await wait_http_ok(f"{self.api_url}/readyz", proc=proc)
        return proc

    async def start_worker(self, *args: str, **extra: str) -> ServiceProcess:
        """A worker; its metrics on ``worker_metrics_port`` if given, else the system's
        (a free port when another worker of it runs)."""
        port = (
            int(extra.pop("worker_metrics_port"))
            if "worker_metrics_port" in extra
            else free_port()
            if any(p.name == "worker" and p.alive() for p in self.procs)
            else self.metrics_port
        )
        env = {
            **self.env,
            "LONGHAUL_WORKER_METRICS_PORT": str(port),
            **{f"LONGHAUL_{k.upper()}": v for k, v in extra.items()},
        }
        proc = ServiceProcess("services.worker", env, list(args), name="worker")
        self.procs.append(proc)
        await wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc=proc)
        return proc

    async def start_gateway(self, **extra: str) -> ServiceProcess:
        env = {
            **self.env,
            "LONGHAUL_GATEWAY_PORT": str(self.gateway_port),
            **{f"LONGHAUL_{k.upper()}": v for k, v in extra.items()},
        }
        proc = ServiceProcess("services.ws_gateway", env, name="gateway")
        self.procs.append(proc)
        await wait_http_ok(f"http://127.0.0.1:{self.gateway_port}/healthz", proc=proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.terminate()


@contextlib.asynccontextmanager
async def api_and_worker(env: Mapping[str, str]) -> AsyncIterator[System]:
    """An API and a worker running with ``env``, stopped on exit."""
    system = System(env)
    try:
        await system.start_api()
        await system.start_worker()
        yield system
    finally:
        system.stop()
