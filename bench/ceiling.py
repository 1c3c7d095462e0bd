"""Scenario 1, the ceilings: what RabbitMQ, PostgreSQL and Redis do on this machine
with raw clients, doing per message what Longhaul does per task.

* RabbitMQ: a quorum queue; one process publishes persistent messages with publisher
  confirms, pipelined (a window of unconfirmed publishes), while another consumes with
  manual acks, concurrently. Throughput = messages / (last ack - first publish).
* PostgreSQL: a task row's lifecycle (INSERT, then two conditional UPDATEs, each its
  own transaction as in Longhaul), from 2 processes.
* Redis: one pipelined XADD (capped) + PUBLISH per message, from 2 processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika
import asyncpg
import orjson
from redis.asyncio import Redis

from bench.child import Child, cpu_self, sleep_until
from bench.infra import BenchEnv
from bench.longhaul import warm_up_size
from bench.stats import cpu_share

QUEUE_ARGS = {"x-queue-type": "quorum"}


# ---------------------------------------------------------------- helper-process roles


async def amqp_publish(a: dict[str, Any]) -> dict[str, Any]:
    conn = await aio_pika.connect(a["url"], timeout=10)
    try:
        channel = await conn.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        window = asyncio.Semaphore(a["window"])
        body = orjson.dumps({"v": 1, "type": "demo.noop", "task_id": str(uuid.uuid4())})
        failed = 0

        async def one(i: str) -> None:
            nonlocal failed
            try:
                await exchange.publish(
                    aio_pika.Message(
                        body, message_id=i, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    ),
                    a["queue"],
                    timeout=30,
                )
            except (aio_pika.exceptions.AMQPError, TimeoutError):
                failed += 1
            finally:
                window.release()

        async def pipelined(ids: list[str]) -> None:
            tasks = []
            for i in ids:
                await window.acquire()
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

        # Warm-up, unmeasured and not counted by the consumer: the channel, the queue
        # and both clients' first messages are then as in the measured run.
        await pipelined([f"warm-{i}" for i in range(a.get("warm", 0))])
        failed = 0
        # The consumer takes them off the queue before the clock starts: the broker's
        # work on them would otherwise fall in the window and lower the ceiling.
        drained = await _drained(channel, a["queue"], a["go_at"])
        await sleep_until(a["go_at"])
        t0, cpu0 = time.time(), cpu_self()
        await pipelined([str(i) for i in range(a["n"])])
        return {
            "t0": t0,
            "t1": time.time(),
            "n": a["n"],
            "failed": failed,
            "warm_up_drained": drained,
            **_window_cpu(cpu0),
        }
    finally:
        await conn.close()


async def amqp_consume(a: dict[str, Any]) -> dict[str, Any]:
    conn = await aio_pika.connect(a["url"], timeout=10)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=a["prefetch"])
        queue = await channel.declare_queue(a["queue"], durable=True, arguments=QUEUE_ARGS)
        done = asyncio.Event()
        got = 0
        first = last = 0.0
        cpu0 = cpu1 = 0.0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got, first, last, cpu0, cpu1
            await message.ack()
            if (message.message_id or "").startswith("warm-"):
                return
            got += 1
            if got == 1:
                first, cpu0 = time.time(), cpu_self()
            if got >= a["n"]:
                last, cpu1 = time.time(), cpu_self()
                done.set()

        await queue.consume(on_message)
        try:
            await asyncio.wait_for(done.wait(), a["timeout"])
        except TimeoutError:
            last, cpu1 = time.time(), cpu_self()
        return {"t_first": first, "t1": last, "n": got, "window_cpu_s": round(cpu1 - cpu0, 3)}
    finally:
        await conn.close()


async def pg_lifecycle(a: dict[str, Any]) -> dict[str, Any]:
    pool = await asyncpg.create_pool(a["dsn"], min_size=a["concurrency"], max_size=a["concurrency"])
    assert pool is not None
    tenant = uuid.UUID(a["tenant_id"])
    n_each = a["n"] // a["concurrency"]
    try:

        async def lane(n_each: int) -> None:
            async with pool.acquire() as conn:
                for _ in range(n_each):
                    tid = uuid.uuid4()
                    await conn.execute(
                        "INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts,"
                        " timeout_s, last_seq) VALUES ($1, $2, 'bench.row', '{}', 'queued', 5,"
                        " 600, 1)",
                        tid,
                        tenant,
                    )
                    await conn.execute(
                        "UPDATE tasks SET state = 'running', attempts = 1, started_at = now(),"
                        " last_seq = last_seq + 1, updated_at = now()"
                        " WHERE id = $1 AND state = 'queued' AND attempts = 0",
                        tid,
                    )
                    await conn.execute(
                        "UPDATE tasks SET state = 'succeeded', progress = 1, result = '{}',"
                        " finished_at = now(), last_seq = last_seq + 1, updated_at = now()"
                        " WHERE id = $1 AND state = 'running' AND attempts = 1",
                        tid,
                    )

        # Warm-up, unmeasured: every connection has prepared its statements.
        warm_each = max(1, a.get("warm", 0) // a["concurrency"])
        await asyncio.gather(*(lane(warm_each) for _ in range(a["concurrency"])))
        await sleep_until(a["go_at"])
        t0, cpu0 = time.time(), cpu_self()
        await asyncio.gather(*(lane(n_each) for _ in range(a["concurrency"])))
        return {"t0": t0, "t1": time.time(), "n": n_each * a["concurrency"], **_window_cpu(cpu0)}
    finally:
        await pool.close()


async def redis_events(a: dict[str, Any]) -> dict[str, Any]:
    redis = Redis.from_url(a["url"], max_connections=a["concurrency"] + 4)
    n_each = a["n"] // a["concurrency"]
    body = orjson.dumps({"task_id": str(uuid.uuid4()), "seq": 1, "state": "running"})
    try:

        async def lane(k: int, n_each: int) -> None:
            for i in range(n_each):
                pipe = redis.pipeline(transaction=False)
                stream = f"{a['prefix']}stream:{k}:{i % 64}"
                pipe.xadd(stream, {"e": body}, maxlen=1000, approximate=True)
                pipe.publish(f"{a['prefix']}events:{k}", body)
                await pipe.execute()

        # Warm-up, unmeasured: every lane has its connection.
        warm_each = max(1, a.get("warm", 0) // a["concurrency"])
        await asyncio.gather(*(lane(k, warm_each) for k in range(a["concurrency"])))
        await sleep_until(a["go_at"])
        t0, cpu0 = time.time(), cpu_self()
        await asyncio.gather(*(lane(k, n_each) for k in range(a["concurrency"])))
        return {"t0": t0, "t1": time.time(), "n": n_each * a["concurrency"], **_window_cpu(cpu0)}
    finally:
        await redis.aclose()


async def _drained(channel: aio_pika.abc.AbstractChannel, queue: str, until: float) -> bool:
    """Whether ``queue`` held no ready message before the wall clock ``until``."""
    while True:
        declared = await channel.declare_queue(queue, passive=True)
        if declared.declaration_result.message_count == 0:
            await asyncio.sleep(0.05)  # the last deliveries' acks
            return True
        if time.time() >= until:
            return False
        await asyncio.sleep(0.05)


def _window_cpu(cpu0: float) -> dict[str, float]:
    """This process's CPU since ``cpu0``: a client's share of the measured window."""
    return {"window_cpu_s": round(cpu_self() - cpu0, 3)}


# ---------------------------------------------------------------- orchestration


async def _one_amqp(env: BenchEnv, n: int, run: int) -> dict[str, Any]:
    queue = f"{env.namespace}.ceiling.{run}"
    env.extra_queues.append(queue)
    conn = await aio_pika.connect(env.amqp_url)
    try:
        ch = await conn.channel()
        await ch.declare_queue(queue, durable=True, arguments=QUEUE_ARGS)
    finally:
        await conn.close()
    go_at = time.time() + 3.0  # after the children started and warmed up
    cons = Child.start(
        env,
        "amqp_consume",
        {"url": env.amqp_url, "queue": queue, "n": n, "prefetch": 256, "timeout": 120},
    )
    pub = Child.start(
        env,
        "amqp_publish",
        {
            "url": env.amqp_url,
            "queue": queue,
            "n": n,
            "window": 512,
            "go_at": go_at,
            "warm": warm_up_size(n),
        },
    )
    p = await pub.result(180)
    c = await cons.result(180)
    wall = c["t1"] - p["t0"]
    # A low ceiling flatters the batch ratio: one that carried the warm-up is left out.
    invalid = {} if p["warm_up_drained"] else {"invalid": "warm-up still queued at the start"}
    return {
        **invalid,
        "msgs_per_s": round(c["n"] / wall, 1) if wall > 0 else None,
        "publish_per_s": round(p["n"] / (p["t1"] - p["t0"]), 1),
        "delivered": c["n"],
        # False: warm-up messages were still queued when the clock started.
        "warm_up_drained": p["warm_up_drained"],
        # The clients' CPU while they were measured: not the start, connects and warm-up.
        "generator_cpu_pct": cpu_share(p["window_cpu_s"] + c["window_cpu_s"], wall),
    }


async def _spread(env: BenchEnv, role: str, args: dict[str, Any], procs: int) -> dict[str, Any]:
    go_at = time.time() + 3.0  # after the children started and warmed up
    children = [
        Child.start(
            env,
            role,
            {
                **args,
                "n": args["n"] // procs,
                "go_at": go_at,
                "warm": warm_up_size(args["n"]) // procs,
            },
        )
        for _ in range(procs)
    ]
    results = [await ch.result(300) for ch in children]
    t0 = min(r["t0"] for r in results)
    t1 = max(r["t1"] for r in results)
    n = sum(r["n"] for r in results)
    return {
        "per_s": round(n / (t1 - t0), 1),
        "n": n,
        "generator_cpu_pct": cpu_share(sum(r["window_cpu_s"] for r in results), t1 - t0),
    }


async def one_round(
    env: BenchEnv, *, n_amqp: int, n_pg: int, n_redis: int, round_no: int
) -> dict[str, dict[str, Any]]:
    """One run of each ceiling, one after the other."""
    return {
        "rabbitmq": await _one_amqp(env, n_amqp, round_no),
        "postgresql": await _spread(
            env,
            "pg_lifecycle",
            {
                "dsn": env.database_url,
                "tenant_id": str(env.tenant_id),
                "n": n_pg,
                "concurrency": 16,
            },
            2,
        ),
        "redis": await _spread(
            env,
            "redis_events",
            {
                "url": env.redis_url,
                "prefix": f"{env.namespace}:ceiling:",
                "n": n_redis,
                "concurrency": 32,
            },
            2,
        ),
    }


def configs(*, n_amqp: int, n_pg: int, n_redis: int) -> dict[str, str]:
    """Each ceiling's description, by name."""
    return {
        "rabbitmq": f"quorum queue, persistent messages, 1 publisher process with confirms "
        f"(window 512 unconfirmed) + 1 consumer process (manual ack, prefetch 256), "
        f"concurrently; N={n_amqp} per run",
        "postgresql": f"task-row lifecycle INSERT + 2 conditional UPDATEs (3 autocommit "
        f"transactions) on the tasks table, 2 processes x 16 connections; N={n_pg} rows per run",
        "redis": f"per message one pipelined XADD (MAXLEN ~1000) + PUBLISH, 2 processes x "
        f"32 concurrent; N={n_redis} per run",
    }
