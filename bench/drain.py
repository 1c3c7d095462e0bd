"""``python -m bench.drain [N] [--mode single|batch ...]``: the quick probe behind the
optimisation log in bench/README.md.

Starts the benchmark's system (1 API, 2 workers, 1 gateway), submits N ``demo.noop``
per mode (single requests with 64 in flight, or batches of 100 with 4 in flight), each
followed to its terminal event on a WebSocket (the end-to-end scenario's tracker), and
prints, per mode, completed/s and per task the CPU time and the sleeps (voluntary
context switches) of each program on the machine (PostgreSQL, RabbitMQ and Redis
included), which tell where the next millisecond is: below saturation, mostly in
wake-ups (bench/machine.py). Private namespace and database, removed at the end.

``--delay S`` submits every task with ``delay_s`` S: all of them wait in the outbox
(when S outlasts the submits) and the relays' polls publish the backlog once it is due,
the way taken after a broker outage. completed/s is then counted from the first due
time."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import aiohttp
import orjson

from bench.infra import BenchEnv, cancel_on_signals, raise_fd_limit, run_loop, to_the_end
from bench.longhaul import LonghaulSystem, Rec, Tracker, _one_run

_TICK = os.sysconf("SC_CLK_TCK")


def _switches(pid: str) -> tuple[int, int]:
    """Voluntary and involuntary context switches of all of a process's threads: each
    voluntary one is a sleep (the wake-up from it can cost more than the work it wakes
    for: bench/machine.py); each involuntary one a preemption by another process."""
    slept = preempted = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                slept += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                preempted += int(line.split()[1])
    return slept, preempted


Usage = tuple[float, int, int]  # CPU seconds, sleeps, preemptions


def _usage_by_program() -> dict[str, Usage]:
    """CPU seconds and context switches of every process now, summed by program
    (services by module)."""
    out: dict[str, Usage] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            slept, preempted = _switches(pid)
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()
        name = os.path.basename(argv[0].decode(errors="replace")) if argv[0] else "?"
        if b"-m" in argv:
            name = argv[argv.index(b"-m") + 1].decode(errors="replace")
        elif "postgres" in stat.split()[1]:
            name = "postgres"
        cpu = (int(fields[11]) + int(fields[12])) / _TICK
        was = out.get(name, (0.0, 0, 0))
        out[name] = (was[0] + cpu, was[1] + slept, was[2] + preempted)
    return out


def _print_usage(before: dict[str, Usage], n: int) -> None:
    """What each program used since ``before``, per task, the busiest first."""
    used = {
        k: tuple(now - was for now, was in zip(v, before.get(k, (0.0, 0, 0)), strict=True))
        for k, v in _usage_by_program().items()
    }
    for name, (cpu, slept, preempted) in sorted(used.items(), key=lambda kv: -kv[1][0])[:8]:
        print(
            f"  {cpu:6.2f} s CPU  {1e3 * cpu / n:5.2f} ms/task  {slept / n:5.1f} sleeps"
            f"  {preempted / n:5.1f} preemptions/task  {name}"
        )


async def _drain(system: LonghaulSystem, n: int, mode: str, delay: float) -> None:
    env = system.env
    headers = {"Authorization": f"Bearer {env.api_key}", "Content-Type": "application/json"}
    batch = 1 if mode == "single" else 100
    url = f"{system.api_url}/v1/tasks" + ("" if batch == 1 else ":batch")
    task = {"type": "demo.noop", **({"delay_s": delay} if delay else {})}
    body = orjson.dumps(task if batch == 1 else {"tasks": [task] * batch})
    async with aiohttp.ClientSession() as http:
        tracker = Tracker(system, http, 32)
        await tracker.start()
        tracker.expected = n
        requests = iter(range(n // batch))
        before = _usage_by_program()
        t0 = time.monotonic()

        async def lane() -> None:
            for _ in requests:
                async with http.post(url, data=body, headers=headers) as r:
                    data = orjson.loads(await r.read())
                    if r.status != 202:
                        raise RuntimeError(f"{r.status}: {data}")
                for task in data["tasks"] if batch > 1 else [data]:
                    await tracker.track(task["id"], Rec(submit=0))

        await asyncio.gather(*(lane() for _ in range(64 if batch == 1 else 4)))
        submitted = time.monotonic() - t0
        await asyncio.wait_for(tracker.all_done.wait(), 300 + delay)
        tracker.check()
        took = time.monotonic() - t0
        await tracker.close()
    delayed = f", due {delay:g} s after the first submit" if delay else ""
    print(f"## {mode}: {n} tasks{delayed}, submitted in {submitted:.2f} s, all terminal")
    print(f"completed/s {n / (took - delay):.0f}; reconnects {tracker.reconnects}")
    _print_usage(before, n)


async def _at_rate(system: LonghaulSystem, n: int, rate: float) -> None:
    """Open loop at ``rate`` single submits/s: the latencies the half-rate targets are
    about, and what each process spent per task at that rate."""
    before = _usage_by_program()
    got = await _one_run(system, n=n, mode="single", rate=rate)
    print(f"## open loop at {rate}/s: {got['accepted']} accepted, {got['late_sends']} late sends")
    for key in (
        "submit_to_202_ms",
        "submit_to_insert_ms",
        "insert_to_running_ms",
        "submit_to_running_ms",
        "submit_to_terminal_ws_ms",
    ):
        lat = got[key]
        print(f"{key}: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}")
    _print_usage(before, n)


async def main(n: int, modes: list[str], rate: float | None, delay: float) -> None:
    cancel_on_signals()
    raise_fd_limit()
    env = BenchEnv()
    system = LonghaulSystem(env)
    try:
        await env.open()
        await system.start()
        if rate is not None:
            await _at_rate(system, n, rate)
            return
        for mode in modes:
            await _drain(system, n, mode, delay)
    finally:
        for proc in system.procs.values():
            proc.stop()
        await to_the_end(env.close())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__)
    parser.add_argument("n", nargs="?", type=int, default=5000)
    parser.add_argument(
        "--mode", nargs="+", choices=("single", "batch"), default=["single", "batch"]
    )
    parser.add_argument(
        "--rate", type=float, help="instead: single submits, open loop at this many per second"
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="submit every task with this delay_s: a backlog the relays' polls publish",
    )
    args = parser.parse_args()
    run_loop(main(args.n, args.mode, args.rate, args.delay))
