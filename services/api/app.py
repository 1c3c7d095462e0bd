"""The API's app factory and process runner. Tests build the app the same way.

``create_app(settings, deps)`` takes connections made by the caller; the app's cleanup
context starts the outbox relay and the queue monitor and stops them (awaited) when the
app shuts down. The caller closes the connections afterwards, in reverse order."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from aiohttp import web
from prometheus_client import Histogram
from redis.asyncio import Redis

from services.api import ops
from services.api.auth import Authenticator
from services.api.backpressure import QueueMonitor
from services.api.context import SERVICES, Services
from services.api.problems import Handler, ProblemException, problem_middleware
from services.api.ratelimit import RateLimiter
from services.api.repository import ApiRepository, OutcomeUnknown
from services.api.requestids import request_id_middleware
from services.api.routes import routes
from services.api.settings import SHUTDOWN_TIMEOUT_S, ApiSettings
from services.api.tasktypes import TaskTypes
from shared import amqp
from shared.amqp import Publisher
from shared.breaker import Breaker
from shared.db import TRANSIENT_ERRORS, create_pool, require_schema
from shared.events import EventSink
from shared.failpoints import Failpoints
from shared.lifecycle import Stop, essential, listening, stop_delay, wait_for_dependency
from shared.liveness import Liveness, stale_after
from shared.redis import create_client, ping
from shared.relay import OutboxRelay
from shared.schemas import ProblemError
from shared.wire import Wire

log = logging.getLogger(__name__)

LATENCY = Histogram(
    "longhaul_api_request_seconds",
    "API request latency",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


@dataclass(frozen=True)
class Deps:
    pool: asyncpg.Pool
    redis: Redis
    amqp: AbstractRobustConnection
    # The process's stop signal: the relay or the queue monitor ending fails it.
    stop: Stop | None = None


@web.middleware
async def dependency_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """PostgreSQL unreachable or too slow: 503 at once, never a hang or a 500."""
    try:
        return await handler(request)
    except asyncpg.DataError as exc:
        # Input that passed validation but that PostgreSQL refuses to store: the
        # client's to fix, not a server error.
        detail = f"a value cannot be stored: {exc}"
        raise ProblemException(
            422,
            "Invalid request",
            detail,
            slug="validation",
            # Every validation failure lists its errors (the contract); PostgreSQL does
            # not say which field, so the body.
            errors=[ProblemError(loc=["body"], msg=detail)],
        ) from None
    except OutcomeUnknown:
        # Not a 503, which promises "not accepted": the tasks may be stored, and will
        # then run. A 504 (the upstream, PostgreSQL, did not answer) promises nothing.
        raise ProblemException(
            504,
            "Outcome unknown",
            "the database connection broke while the task was being stored, and the"
            " database could not be asked since whether it was: it may have been accepted,"
            " and may run. A retry with the same Idempotency-Key is safe (it answers the"
            " stored task, or stores it once); a retry without one may run it twice",
            slug="outcome-unknown",
            headers={"Retry-After": "5"},
        ) from None
    except TRANSIENT_ERRORS:
        raise ProblemException(
            503,
            "Service Unavailable",
            "the database is unreachable or too slow",
            slug="database-unavailable",
            headers={"Retry-After": "5"},
        ) from None


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        LATENCY.labels(request.method, route, str(status)).observe(time.perf_counter() - start)


def create_app(settings: ApiSettings, deps: Deps) -> web.Application:
    wire = Wire(settings.namespace)
    timeout = settings.io_timeout_s
    # One breaker for every Redis call of the process: down is down for all of them.
    redis_breaker = Breaker()
    events = EventSink(
        deps.redis,
        wire,
        retention_s=settings.event_retention_s,
        maxlen=settings.event_stream_maxlen,
        breaker=redis_breaker,
    )
    relay = None
    if settings.relay_enabled:
        relay = OutboxRelay(
            deps.pool,
            _LazyPublisher(deps.amqp, wire, timeout),
            events,
            dsn=settings.database_url,
            failpoints=Failpoints(settings.failpoints),
            timeout=timeout,
        )
    repo = ApiRepository(
        deps.pool,
        timeout=timeout,
        hand_over=relay.hand_over if relay is not None else None,
        claim_s=settings.handoff_claim_s,
        owner=relay.owner_key if relay is not None else None,
    )
    svc = Services(
        settings=settings,
        wire=wire,
        repo=repo,
        auth=Authenticator(repo, settings.auth_cache_s),
        types=TaskTypes(repo, settings.task_types_refresh_s),
        limiter=RateLimiter(
            deps.redis, wire, settings.rate_limit_per_s, settings.rate_limit_burst, redis_breaker
        ),
        monitor=QueueMonitor(
            deps.amqp,
            deps.pool,
            wire,
            limit=settings.max_queue_depth,
            delayed_limit=settings.max_delayed_tasks,
            interval_s=settings.queue_depth_refresh_s,
            timeout=timeout,
        ),
        relay=relay,
        events=events,
        redis=deps.redis,
        stop=deps.stop,
    )
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # Order: metrics sees the final status; every response, a problem or not, gets
        # its request id; problems renders every error, including the 503 the
        # dependency middleware raises.
        middlewares=[
            metrics_middleware,
            request_id_middleware,
            problem_middleware,
            dependency_middleware,
        ],
    )
    app[SERVICES] = svc
    app.add_routes(routes)
    ops.add_routes(app, settings.public_ws_url)
    ops.add_readiness(app, svc)
    app[ops.LIVENESS] = Liveness()
    app.cleanup_ctx.append(functools.partial(_background, stop=deps.stop))
    return app


async def _background(app: web.Application, stop: Stop | None) -> AsyncIterator[None]:
    """Start the relay and the queue monitor with the app; stop and await them after.
    Either ending before that fails the process's ``stop``: without its relay the API
    would accept tasks nobody publishes, without its monitor refuse them all."""
    svc = app[SERVICES]
    s = svc.settings
    jobs_stop = asyncio.Event()
    # Each beats once a turn: /healthz names one that stops (shared.liveness).
    watched = functools.partial(essential, stop=stop, until=jobs_stop, liveness=app[ops.LIVENESS])
    tasks = [
        watched(
            svc.monitor.run(jobs_stop),
            "queue-monitor",
            # A sample, then the delayed rows' count.
            within=stale_after(s.queue_depth_refresh_s, s.io_timeout_s, calls=2),
        )
    ]
    if svc.relay is not None:
        tasks.append(
            watched(svc.relay.run(jobs_stop), "outbox-relay", within=svc.relay.stale_after_s())
        )
    yield
    try:
        # The last inserts first: their tasks are handed to the relay, which publishes
        # them before it stops.
        await svc.repo.aclose()
    finally:
        jobs_stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await svc.events.aclose()


class _LazyPublisher(Publisher):
    """A Publisher whose confirm channel is opened on first use (and again after the
    broker closed it), so the app factory does no I/O."""

    def __init__(self, connection: AbstractRobustConnection, wire: Wire, timeout: float) -> None:
        self._connection = connection
        self._wire = wire
        self._timeout = timeout
        self._confirming: AbstractChannel | None = None
        self._ready: Publisher | None = None
        # The relay's two loops publish at once: one of them opens the channel, or the
        # other's would be left open (and restored by the robust connection forever).
        self._opening = asyncio.Lock()

    async def publish(self, batch: Sequence[amqp.Outgoing]) -> amqp.Published:
        async with self._opening:
            if self._ready is None or self._confirming is None or self._confirming.is_closed:
                try:
                    await self._open()
                except (AMQPError, OSError, RuntimeError, TimeoutError) as exc:
                    # The broker is away: nothing of the batch went out, as with a
                    # channel that fails under a publish. The relay keeps the rows.
                    error = f"no channel to publish on: {type(exc).__name__}: {exc}"
                    return amqp.Published([False] * len(batch), failed=len(batch), error=error)
            ready = self._ready
        assert ready is not None
        return await ready.publish(batch)

    async def _open(self) -> None:
        self._confirming = await asyncio.wait_for(
            self._connection.channel(publisher_confirms=True, on_return_raises=True),
            self._timeout,
        )
        self._ready = amqp.task_publisher(self._confirming, self._wire, self._timeout)


async def serve(settings: ApiSettings, stop: Stop) -> None:
    """Connect, declare the topology, serve until ``stop``, then drain and close."""
    timeout = settings.io_timeout_s
    async with AsyncExitStack() as stack:
        pool = await wait_for_dependency(
            "PostgreSQL",
            lambda: create_pool(
                settings.database_url, max_size=settings.db_pool_size, timeout=timeout
            ),
            settings.start_timeout_s,
            stop,
        )
        stack.push_async_callback(pool.close)
        await require_schema(pool)
        redis = create_client(settings.redis_url, timeout)
        stack.push_async_callback(redis.aclose)
        await wait_for_dependency(
            "Redis", lambda: ping(redis, settings.redis_url), settings.start_timeout_s, stop
        )
        connection = await wait_for_dependency(
            "RabbitMQ",
            lambda: amqp.connect(settings.amqp_url, "longhaul-api", timeout),
            settings.start_timeout_s,
            stop,
        )
        stack.push_async_callback(amqp.close, connection, timeout)
        async with amqp.starting("topology not declared", timeout):
            channel = await connection.channel()
            await amqp.declare(channel, settings, Wire(settings.namespace))
            await channel.close()

        app = create_app(settings, Deps(pool, redis, connection, stop))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(
            runner, settings.api_host, settings.api_port, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        with listening(settings.api_host, settings.api_port, "LONGHAUL_API_HOST/_PORT"):
            await site.start()
        log.info("api ready", extra={"url": f"http://{settings.api_host}:{settings.api_port}"})
        await stop.wait()
        # /readyz says 503 from the stop on (ops.readyz): still serving meanwhile.
        await stop_delay(stop, settings.stop_delay_s, "api")
        log.info("api stopping")
