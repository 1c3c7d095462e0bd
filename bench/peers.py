"""Scenario 3: Celery and Dramatiq on the same RabbitMQ and Redis, 2 worker processes
each, running the same no-op, in the same run as Longhaul.

Celery: 2 worker processes with ``--pool=solo`` (one task at a time each; no prefork
IPC). Dramatiq: ``--processes 2 --threads 8``. Both use classic durable queues, their
default. The client is one process with 8 submitting threads, each on its own
connection (see CLIENT_THREADS)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import aio_pika
import orjson

from bench.infra import BenchEnv, CpuMeter, Proc, python
from bench.longhaul import warm_up_size
from bench.stats import cpu_share

CONFIGS = {
    "celery_safe": (
        "celery",
        "safe",
        "Celery: publisher confirms, acks_late, Redis result backend, prefetch 16/process, "
        "the client waits for every result",
    ),
    "celery_unsafe": (
        "celery",
        "unsafe",
        "Celery fastest unsafe: no confirms, ack on receipt, no results, prefetch "
        "128/process (completion via a 20 ms-batched Redis counter)",
    ),
    "dramatiq_safe": (
        "dramatiq",
        "safe",
        "Dramatiq: publisher confirms (confirm_delivery), ack after the actor, prefetch "
        "16/process, completion via a 20 ms-batched Redis counter",
    ),
    "dramatiq_unsafe": (
        "dramatiq",
        "unsafe",
        "Dramatiq fastest unsafe: no confirms, prefetch 64/process, completion via the counter",
    ),
}
# The client's publishing threads, each on its own connection and channel (with
# confirms, one publish outstanding each). Not Longhaul's 64 requests in flight: on two
# cores more threads made every peer slower (a 64-thread client took the CPU and the GIL
# its workers needed; bench/README.md, twenty-third session), so the peers get the
# count that served them best.
CLIENT_THREADS = 8


async def _consumers(url: str, queue: str) -> int:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return int(q.declaration_result.consumer_count or 0)
    except aio_pika.exceptions.ChannelClosed:
        return 0
    finally:
        await conn.close()


async def _start_workers(env: BenchEnv, which: str, penv: dict[str, str], queue: str) -> list[Proc]:
    if which == "celery":
        procs = [
            env.spawn(
                python(
                    "-m",
                    "celery",
                    "-A",
                    "bench.peer_celery",
                    "worker",
                    "--pool=solo",
                    "-Q",
                    queue,
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-n",
                    f"w{i}.{queue}@localhost",
                    "--loglevel=WARNING",
                ),
                f"celery{i}",
                penv,
            )
            for i in range(2)
        ]
    else:
        procs = [
            env.spawn(
                python(
                    "-m",
                    "dramatiq",
                    "bench.peer_dramatiq",
                    "--processes",
                    "2",
                    "--threads",
                    "8",
                    "--queues",
                    queue,
                ),
                "dramatiq",
                penv,
            )
        ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not all(p.alive() for p in procs):
            raise RuntimeError(f"{which} worker died:\n{procs[0].tail()}")
        if await _consumers(env.amqp_url, queue) >= 2:
            return procs
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{which} workers did not start consuming {queue}")


async def _client(env: BenchEnv, which: str, penv: dict[str, str], n: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *python("-m", "bench.peer_client", which, str(n), str(CLIENT_THREADS), "300"),
        env={**os.environ, **penv},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 400)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} client failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = orjson.loads(out.decode().strip().splitlines()[-1])
    return result


def _penv(env: BenchEnv, name: str, mode: str) -> dict[str, str]:
    queue = f"{env.namespace}_{name}"
    return {
        "BENCH_PEER_QUEUE": queue,
        "BENCH_PEER_MODE": mode,
        "BENCH_AMQP_URL": env.amqp_url,
        "BENCH_REDIS_URL": env.redis_url,
        "BENCH_PEER_PREFIX": f"{env.namespace}:peer:{name}:",
        # Dramatiq's prefetch is per consumer, one per queue per worker process.
        "dramatiq_queue_prefetch": "16" if mode == "safe" else "64",
    }


def configs(n: int) -> dict[str, str]:
    """Each configuration's description, by name."""
    return {
        name: f"{config}; 2 worker processes; client {CLIENT_THREADS} threads; N={n}"
        for name, (_, _, config) in CONFIGS.items()
    }


async def one_round(env: BenchEnv, *, n: int) -> dict[str, dict[str, Any]]:
    """One run of every configuration, each on workers started for it and stopped after
    it: the machine runs nothing else of the benchmark meanwhile."""
    out: dict[str, dict[str, Any]] = {}
    for name, (which, mode, _) in CONFIGS.items():
        penv = _penv(env, name, mode)
        queue = penv["BENCH_PEER_QUEUE"]
        if queue not in env.extra_queues:  # removed at the end of the benchmark
            env.extra_queues += [queue, f"{queue}.DQ", f"{queue}.XQ"]
            env.extra_exchanges += [queue, f"{queue}.pidbox", f"{queue}.ev"]
        t_start = time.monotonic()
        workers = await _start_workers(env, which, penv, queue)
        print(f"   {name}: workers up in {time.monotonic() - t_start:.1f}s", file=sys.stderr)
        try:
            await _client(env, which, penv, warm_up_size(n))  # unmeasured
            meter = CpuMeter(
                {"workers": workers[0]}
                if len(workers) == 1
                else {f"worker{i}": w for i, w in enumerate(workers)}
            )
            meter.start()
            r = await _client(env, which, penv, n)
            cpu = meter.stop()
        finally:
            _stop_workers(name, which, workers)
        wall = r["t_done"] - r["t0"]
        out[name] = {
            "accepted_per_s": round(r["n"] / (r["t_submitted"] - r["t0"]), 1),
            "completed_per_s": round(r["done"] / wall, 1) if wall > 0 else None,
            "completed": r["done"],
            "generator_cpu_pct": cpu_share(r["cpu_s"], wall),
            **{k: v for k, v in cpu.items() if k != "generator_cpu_pct"},
        }
    return out


def _stop_workers(name: str, which: str, workers: list[Proc]) -> None:
    t_stop = time.monotonic()
    # Celery's shutdown takes ~10 s per worker here, warm or cold; the run is over, so
    # it gets SIGQUIT and then SIGKILL after 2 s. Dramatiq stops promptly on SIGTERM.
    sig = signal.SIGQUIT if which == "celery" else signal.SIGTERM
    for w in workers:
        w.send_signal(sig)
    for w in workers:
        w.stop(wait=2.0 if which == "celery" else 20.0, sig=sig)
    print(f"   {name}: stopped in {time.monotonic() - t_stop:.1f}s", file=sys.stderr)
