"""Helper processes of the load generator: ``python -m bench.child ROLE``, arguments as
JSON on the first stdin line.

A role is an async function of the JSON arguments; it may print progress lines
(``READY ...``) and read commands from stdin, and its result (JSON, including its own CPU
seconds) goes to a file named on its last stdout line, ``RESULT <path>``. Work is spread over processes so that one Python
client process is not what a ceiling measures."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from bench.infra import Proc, python, run_loop


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _roles() -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
    from bench import ceiling, wsclients  # noqa: PLC0415 - they import this module

    return {
        "amqp_publish": ceiling.amqp_publish,
        "amqp_consume": ceiling.amqp_consume,
        "pg_lifecycle": ceiling.pg_lifecycle,
        "redis_events": ceiling.redis_events,
        "ws_idle": wsclients.idle_clients,
        "ws_fanout": wsclients.fanout_clients,
        "ws_raw_server": wsclients.raw_broadcast_server,
        "publish_clock": wsclients.publish_clock,
    }


def main() -> int:
    role = sys.argv[1]
    # Arguments come as the first stdin line: they can be larger than argv allows.
    args = json.loads(sys.stdin.readline())
    fn = _roles()[role]
    result = run_loop(fn(args))
    result["cpu_s"] = round(cpu_self(), 3)
    # Results can be megabytes (latency samples): through a file, not the pipe, which
    # cut long lines at 64 KiB here.
    fd, path = tempfile.mkstemp(prefix="lhbench-result-", suffix=".json")
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(result))
    say(f"RESULT {path}")
    return 0


class Child:
    """The parent's handle on one helper process."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    @classmethod
    def start(cls, env: Any, role: str, args: dict[str, Any], name: str | None = None) -> Child:
        proc = env.spawn(
            python("-m", "bench.child", role), name or role, stdin=True, stdout_pipe=True
        )
        child = cls(proc)
        child.send(json.dumps(args))
        return child

    async def readline(self, timeout: float) -> str:
        assert self.proc.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"{self.proc.name} ended without output:\n{self.proc.tail()}")
        return line.decode().strip()

    async def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = await self.readline(max(0.1, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.proc.proc.stdin is not None
        self.proc.proc.stdin.write((line + "\n").encode())
        self.proc.proc.stdin.flush()

    async def result(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = await self.readline(max(0.1, deadline - time.monotonic()))
            if line.startswith("RESULT "):
                path = Path(line.split(" ", 1)[1])
                out: dict[str, Any] = orjson.loads(await asyncio.to_thread(path.read_bytes))
                await asyncio.to_thread(path.unlink)
                await asyncio.to_thread(self.proc.proc.wait, 30)
                return out


async def stdin_line() -> str:
    """The next line the parent sends (empty when it closed stdin)."""
    return (await asyncio.to_thread(sys.stdin.readline)).strip()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
