"""Wires one worker process together and runs it until stopped, then drains.

Shutdown order (Dramatiq's "stop workers before consumers", aio-pika's drain): stop
consuming, let running tasks finish or hand them back, stop the relay and the periodic
jobs, then close the handlers' threads, the AMQP channel, Redis and the pool, in that
order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from aiohttp import web
from redis.asyncio import Redis

from services.worker.consumer import WATCH_S, Consumer
from services.worker.control import RESUBSCRIBE_MAX_S, listen, may_subscribe
from services.worker.deadletters import DeadLetterSink
from services.worker.handback import HandBacks
from services.worker.maintenance import (
    fire_schedules,
    heartbeat,
    heartbeat_period_s,
    lease_watch,
    lease_watch_period_s,
    purge,
    purge_period_s,
    reaper,
    reaper_period_s,
)
from services.worker.registry import Registry
from services.worker.repository import WorkerRepository
from services.worker.runner import Runner
from services.worker.settings import WorkerSettings
from services.worker.threads import HandlerThreads
from shared import amqp, db
from shared.db import create_pool, require_schema
from shared.events import EventSink
from shared.failpoints import Failpoints
from shared.health import METRICS_CONTENT_TYPE, Readiness, metrics_text
from shared.lifecycle import Stop, essential, listening, wait_for_dependency
from shared.liveness import Liveness, stale_after
from shared.redis import create_client, ping
from shared.relay import OutboxRelay
from shared.wire import Wire

log = logging.getLogger(__name__)


async def run_worker(settings: WorkerSettings, registry: Registry, stop: Stop) -> None:
    wire = Wire(settings.namespace)
    failpoints = Failpoints(settings.failpoints)
    # The random part: containers with the host's name and PID 1 would share an id, and
    # renew each other's leases (a dead one's tasks never reaped).
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    timeout = settings.io_timeout_s
    async with AsyncExitStack() as stack:
        pool, redis, connection = await _dependencies(settings, stack, stop, worker_id)
        await may_subscribe(redis, wire, settings.redis_url, timeout)

        # Its statements go without lingering once worker_concurrency deliveries wait
        # for one: normal deliveries alone never reach more (the reserve is for the
        # high lane's), and a threshold they cannot reach made each statement linger.
        repo = WorkerRepository(pool, timeout=timeout, concurrency=settings.worker_concurrency)
        with db.starting("task types not registered"):
            await repo.register_types(registry.specs())
        events = EventSink(
            redis, wire, retention_s=settings.event_retention_s, maxlen=settings.event_stream_maxlen
        )

        # Each consumer on a channel of its own: the consumer acks runs of deliveries
        # with one multiple ack, which settles every older delivery of its channel. At
        # most worker_concurrency deliveries of both lanes run at once, and
        # worker_high_reserved more of the high lane's (the consumer's gate), whose
        # prefetch covers both.
        normal_prefetch = settings.worker_concurrency
        high_prefetch = normal_prefetch + settings.worker_high_reserved
        channel, topology = await _consuming_channel(connection, settings, wire, normal_prefetch)
        high_channel, high_topology = await _consuming_channel(
            connection, settings, wire, high_prefetch
        )
        # A thread for every run slot, for plain def handlers; shut down once the drain
        # ended (the stack closes after it).
        threads = HandlerThreads(settings.worker_concurrency + settings.worker_high_reserved)
        stack.callback(threads.shutdown)
        runner = Runner(settings, repo, events, registry, failpoints, worker_id, threads)
        consumer = Consumer(
            topology.queue,
            runner,
            timeout,
            settings.worker_concurrency,
            high_queue=high_topology.high_queue,
            reserved=settings.worker_high_reserved,
        )
        _, dead_letter_topology = await _consuming_channel(connection, settings, wire)
        sink = DeadLetterSink(dead_letter_topology.dead_letters, repo, events)

        jobs = _Jobs(stop)
        health = await _serve_health(settings, pool, redis, connection, consumer, jobs.liveness)
        stack.push_async_callback(health.cleanup)

        # Each loop beats once a turn; how long it may go without (shared.liveness): its
        # longest wait between turns, and the calls a turn makes (each up to the timeout).
        lease_s, retention_s = settings.lease_s, settings.task_retention_s
        if settings.relay_enabled:
            relay = await _relay(settings, wire, stack, pool, events, failpoints, worker_id, stop)
            jobs.start(relay.run(jobs.until), "outbox-relay", relay.stale_after_s())
        jobs.start(
            heartbeat(repo, runner, worker_id, lease_s, jobs.until, registry.names(), failpoints),
            "lease-heartbeat",
            stale_after(heartbeat_period_s(lease_s), timeout, calls=2),  # renewal, types
        )
        jobs.start(
            lease_watch(runner, lease_s, jobs.until),
            "lease-watch",
            stale_after(lease_watch_period_s(lease_s), 0),
        )
        jobs.start(
            reaper(repo, events, lease_s, jobs.until),
            "reaper",
            stale_after(reaper_period_s(lease_s), timeout, calls=3),  # ping, reap, events
        )
        jobs.start(
            listen(redis, wire, runner, jobs.until),
            "control-listener",
            stale_after(RESUBSCRIBE_MAX_S, timeout, calls=2),  # subscribe, read
        )
        jobs.start(
            consumer.watch(jobs.until),
            "consumer-watchdog",
            stale_after(WATCH_S, timeout, calls=2),  # per queue: its check, a consume again
        )
        jobs.start(
            fire_schedules(repo, settings.schedule_poll_s, jobs.until),
            "schedule-firing",
            # Beats per batch (and per fire stored alone): due, types, insert, advance.
            stale_after(settings.schedule_poll_s, timeout, calls=4),
        )
        if retention_s > 0:
            jobs.start(
                purge(repo, retention_s, jobs.until),
                "task-purge",
                stale_after(purge_period_s(retention_s), timeout),  # beats per batch
            )

        try:
            await _start_consuming(consumer, sink, failpoints, timeout)
            log.info(
                "worker ready",
                extra={
                    "worker_id": worker_id,
                    "types": registry.names(),
                    "concurrency": settings.worker_concurrency,
                    "high_reserved": settings.worker_high_reserved,
                },
            )
            await stop.wait()
            log.info("stopping: draining")
        finally:
            # After a failed start too: what it started (a lane's consumer, the loops)
            # is stopped and awaited before the connections close under it.
            await _drain(settings, consumer, sink, jobs, repo, events, (high_channel, channel))
        log.info("worker stopped")
        await _leave_abandoned(stack, runner.abandoned, runner.handbacks, settings.cancel_grace_s)


async def _dependencies(
    settings: WorkerSettings, stack: AsyncExitStack, stop: Stop, worker_id: str
) -> tuple[asyncpg.Pool, Redis, AbstractRobustConnection]:
    """PostgreSQL (its schema checked), Redis and RabbitMQ, each waited for at start and
    closed by ``stack``."""
    timeout = settings.io_timeout_s
    pool = await wait_for_dependency(
        "PostgreSQL",
        lambda: create_pool(
            settings.database_url,
            max_size=min(settings.worker_concurrency + settings.worker_high_reserved + 4, 40),
            timeout=timeout,
            generic_plans=True,
        ),
        settings.start_timeout_s,
        stop,
    )
    stack.push_async_callback(pool.close)
    await require_schema(pool)
    redis: Redis = create_client(settings.redis_url, timeout)
    stack.push_async_callback(redis.aclose)
    await wait_for_dependency(
        "Redis", lambda: ping(redis, settings.redis_url), settings.start_timeout_s, stop
    )
    connection = await wait_for_dependency(
        "RabbitMQ",
        lambda: amqp.connect(settings.amqp_url, f"longhaul-worker {worker_id}", timeout),
        settings.start_timeout_s,
        stop,
    )
    stack.push_async_callback(amqp.close, connection, timeout)
    return pool, redis, connection


class _Jobs:
    """The worker's background loops. Each runs until ``until``, set once the consumers
    have drained (or the start failed); one that ends before that stops the worker
    (shared.lifecycle.essential)."""

    def __init__(self, stop: Stop) -> None:
        self.until = asyncio.Event()
        self.liveness = Liveness()
        self._stop = stop
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: Coroutine[Any, Any, None], name: str, within: float) -> None:
        """``within``: how long the loop may go without a beat (shared.liveness)."""
        self._tasks.append(
            essential(
                loop, name, self._stop, until=self.until, liveness=self.liveness, within=within
            )
        )

    async def aclose(self) -> None:
        self.until.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _drain(
    settings: WorkerSettings,
    consumer: Consumer,
    sink: DeadLetterSink,
    jobs: _Jobs,
    repo: WorkerRepository,
    events: EventSink,
    channels: tuple[AbstractChannel, ...],
) -> None:
    """Stop taking work and let what runs finish or hand it back, stop the loops, wait
    for what is being written, then close the consuming channels."""
    timeout = settings.io_timeout_s
    await consumer.drain(
        settings.shutdown_grace_s, handback_s=settings.cancel_grace_s + 2 * timeout
    )
    await sink.stop(timeout)
    await jobs.aclose()
    await repo.aclose()
    await events.aclose()
    for consumed in channels:
        with contextlib.suppress(AMQPError, RuntimeError, TimeoutError):
            await asyncio.wait_for(consumed.close(), timeout)


async def _start_consuming(
    consumer: Consumer, sink: DeadLetterSink, failpoints: Failpoints, timeout: float
) -> None:
    """Consume both lanes and the dead letters. A broker that refuses or does not
    answer stops the start, told in one line."""
    async with amqp.starting("consumers not started", timeout):
        await consumer.start()
        await failpoints.hit("worker.before_dead_letter_consumer")
        await sink.start()


async def _consuming_channel(
    connection: AbstractRobustConnection,
    settings: WorkerSettings,
    wire: Wire,
    prefetch: int | None = None,
) -> tuple[AbstractChannel, amqp.Topology]:
    """A channel for one consumer, its prefetch (the worker's concurrency unless
    given), and the topology declared on it."""
    async with amqp.starting("topology not declared", settings.io_timeout_s):
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch or settings.worker_concurrency)
        return channel, await amqp.declare(channel, settings, wire)


async def _leave_abandoned(
    stack: AsyncExitStack,
    handlers: set[asyncio.Task[Any]],
    handbacks: HandBacks,
    grace_s: float,
) -> None:
    """Handlers that ignored their cancellation: a last wait, then exit without them.
    The event loop's own shutdown would wait for them for as long as they run, and a
    stopping worker must stop. The attempt of each one the stop interrupted is handed
    back once it ended, or just before the exit that ends it: never while it runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    running = set(handlers)
    while True:
        # Each as it ends: its next attempt need not wait for the others.
        await handbacks.release(ended_only=True)
        if not running or loop.time() >= deadline:
            break
        _, running = await asyncio.wait(
            running, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
        )
    if not running:
        return
    log.warning(
        "exiting with handlers that ignored cancellation still running",
        extra={"count": len(running)},
    )
    if handbacks:
        # Nothing awaited between these commits and the exit: the loop would run the
        # handlers on beside the next attempts. The exit closes the connections.
        await handbacks.release()
    else:
        await stack.aclose()
    logging.shutdown()
    os._exit(0)


async def _relay(
    settings: WorkerSettings,
    wire: Wire,
    stack: AsyncExitStack,
    pool: asyncpg.Pool,
    events: EventSink,
    failpoints: Failpoints,
    worker_id: str,
    stop: Stop,
) -> OutboxRelay:
    """This process's outbox relay (retries, delayed tasks), with its own connection:
    RabbitMQ's flow control throttles a publishing connection, and on a shared one that
    would also stall our acks."""
    timeout = settings.io_timeout_s
    # Waited for as the first connection is: a broker at its connection limit, or one
    # restarting, may refuse this one alone.
    publishing = await wait_for_dependency(
        "RabbitMQ (the outbox relay's connection)",
        lambda: amqp.connect(settings.amqp_url, f"longhaul-worker-relay {worker_id}", timeout),
        settings.start_timeout_s,
        stop,
    )
    stack.push_async_callback(amqp.close, publishing, timeout)
    async with amqp.starting("the outbox relay's channel not opened", timeout):
        publish_channel = await publishing.channel(publisher_confirms=True, on_return_raises=True)
    return OutboxRelay(
        pool,
        amqp.task_publisher(publish_channel, wire, timeout),
        events,
        dsn=settings.database_url,
        failpoints=failpoints,
        timeout=timeout,
    )


async def _serve_health(
    settings: WorkerSettings,
    pool: asyncpg.Pool,
    redis: Redis,
    connection: AbstractRobustConnection,
    consumer: Consumer,
    liveness: Liveness,
) -> web.AppRunner:
    """/healthz, /readyz and /metrics on LONGHAUL_WORKER_METRICS_PORT."""

    async def healthz(_: web.Request) -> web.Response:
        ok, body = liveness.report()
        return web.json_response(body, status=200 if ok else 503)

    async def amqp_check() -> None:
        if connection.is_closed:
            raise ConnectionError("closed")
        if not await consumer.consuming():
            raise ConnectionError("not consuming")

    readiness = Readiness(
        {
            "postgresql": lambda: pool.fetchval("SELECT 1"),
            "redis": redis.ping,
            "rabbitmq": amqp_check,
        },
        answer_within=settings.ready_timeout_s,
        check_timeout=settings.io_timeout_s,
    )

    async def readyz(_: web.Request) -> web.Response:
        ok, body = await readiness()
        return web.json_response(body, status=200 if ok else 503)

    async def close_readiness(_: web.Application) -> None:
        await readiness.aclose()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics_text(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.on_cleanup.append(close_readiness)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = settings.worker_metrics_host, settings.worker_metrics_port
    with listening(host, port, "LONGHAUL_WORKER_METRICS_HOST/_PORT"):
        # A response stuck in a client's socket holds the stop this long (twice).
        await web.TCPSite(runner, host, port, shutdown_timeout=settings.io_timeout_s).start()
    return runner
