"""The gateway's server factory: dependencies, the WebSocket server and its HTTP routes.

``Gateway(settings).start()`` is an async context manager that yields once the gateway
serves, and on exit closes clients with 1001 and releases everything in reverse order;
``__main__`` and the tests build it the same way."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import weakref
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import MultipleValuesError
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from services.ws_gateway import refusals, sse
from services.ws_gateway.frames import FrameCache
from services.ws_gateway.handshake import DeadlineConnection, connection_class
from services.ws_gateway.hub import Hub
from services.ws_gateway.keystates import KeyStates
from services.ws_gateway.leases import Leases
from services.ws_gateway.metrics import GatewayMetrics
from services.ws_gateway.origins import origin_allowed, parse_allowed_origins
from services.ws_gateway.registry import Refused, Registry
from services.ws_gateway.repository import TaskRepository
from services.ws_gateway.responses import json_response, problem, respond
from services.ws_gateway.revocation import Holders, Revoker
from services.ws_gateway.session import DependencyDown, Deps, Session
from services.ws_gateway.settings import GatewaySettings
from services.ws_gateway.streams import StreamReader
from services.ws_gateway.sweep import Sweeper
from shared import wstokens
from shared.db import ANY_PG_ERROR, create_pool, require_schema
from shared.errors import StartTimeout
from shared.health import Readiness
from shared.lifecycle import Stop, essential, listening, until_stopped, wait_for_dependency
from shared.liveness import Liveness, stale_after
from shared.redis import create_client, ping
from shared.wire import Wire

log = logging.getLogger(__name__)

WS_PATH = "/v1/ws"
_SSE_PATH = re.compile(r"^/v1/tasks/([^/]+)/events$")
_OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


_REFUSED_401 = "missing, invalid, expired or already used token"
_WS_REFUSES_TASK_TOKENS = "a task token opens that task's SSE stream only, not a WebSocket"
_STORE_DOWN_503 = "the token store is unavailable; try again"
_DB_DOWN_503 = "database unavailable"
_REVOKED = "the API key that asked for this token was revoked"


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.wire = Wire(settings.namespace)
        self.origins = parse_allowed_origins(settings.allowed_origins)
        self.registry: Registry[Any] = Registry(
            max_connections=settings.max_connections,
            max_per_tenant=settings.max_connections_per_tenant,
            max_subscriptions=settings.max_subscriptions_per_connection,
        )
        self.metrics = GatewayMetrics(
            connections=lambda: float(self.registry.connection_count),
            subscriptions=lambda: float(self.registry.subscription_count),
        )
        # Tenant and API key of each handshake that passed auth, for the handler to pick
        # up; weak so that a handshake failing after process_request leaves nothing behind.
        self._admitted: weakref.WeakKeyDictionary[ServerConnection, tuple[UUID, str | None]] = (
            weakref.WeakKeyDictionary()
        )
        # The open WebSocket sessions and SSE streams of each API key, for its revocation.
        self._holders: Holders[Session | sse.Stream] = Holders()
        self._redis: Redis | None = None
        self._leases: Leases | None = None
        # The lease of each connection that holds one, given back when it goes.
        self._lease_of: dict[DeadlineConnection, str] = {}
        self._deps: Deps | None = None
        self._key_states: KeyStates | None = None
        self._server: Server | None = None
        self._streams: set[sse.Stream] = set()
        self._closing = False
        # The process's stop signal (None for a gateway a test starts without one): once
        # set, /readyz says "stopping" while the gateway serves on (LONGHAUL_STOP_DELAY_S).
        self._stop: Stop | None = None
        self.hub: Hub | None = None
        self._readiness: Readiness | None = None
        # The beats of the loops below (shared.liveness), told by /healthz.
        self.liveness = Liveness()
        self.port: int = 0

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def start(self, stop: Stop | None = None) -> AsyncIterator[Gateway]:
        s = self.settings
        self._stop = stop
        async with contextlib.AsyncExitStack() as stack:
            pool: asyncpg.Pool = await wait_for_dependency(
                "PostgreSQL",
                lambda: create_pool(
                    s.database_url,
                    min_size=1,
                    max_size=10,
                    timeout=s.io_timeout_s,
                    generic_plans=True,
                ),
                s.start_timeout_s,
                stop,
            )
            stack.push_async_callback(pool.close)
            await require_schema(pool)
            redis = create_client(s.redis_url, s.io_timeout_s)
            stack.push_async_callback(redis.aclose)
            await wait_for_dependency(
                "Redis", lambda: ping(redis, s.redis_url), s.start_timeout_s, stop
            )
            self._redis = redis
            repository = TaskRepository(pool, s.io_timeout_s)
            stack.push_async_callback(repository.aclose)
            streams = StreamReader(redis, self.wire, max_events=s.event_stream_maxlen)
            stack.push_async_callback(streams.aclose)
            self._deps = Deps(
                registry=self.registry,
                repository=repository,
                streams=streams,
                metrics=self.metrics,
                queue_size=s.client_queue_size,
                snapshot_grace_s=s.snapshot_grace_s,
                close_timeout_s=s.close_timeout_s,
                frame_cache=FrameCache(),
            )
            self.hub = Hub(
                s.redis_url, self.wire, self.registry, self.metrics, io_timeout=s.io_timeout_s
            )
            self._readiness = self._readiness_checks(redis, repository, self.hub)
            stack.push_async_callback(self._readiness.aclose)
            # The hub, the sweep, the revocation check and the renewal of leases run until
            # cancelled: one that ends before that stops the gateway
            # (shared.lifecycle.essential). Each but the hub beats once a turn, and one
            # that stops is named by /healthz (shared.liveness); the hub waits on its
            # subscription for as long as it lasts, with a PING of its own when idle.
            watched = functools.partial(essential, stop=stop, liveness=self.liveness)
            hub_task = essential(self.hub.run(), "gateway-hub", stop)
            stack.push_async_callback(_cancel_and_wait, hub_task)
            sweeper = Sweeper(self.registry, repository, self.metrics, s.subscription_check_s)
            sweep_task = watched(
                sweeper.run(),
                "gateway-sweep",
                within=stale_after(s.subscription_check_s, s.io_timeout_s, calls=2),
            )
            stack.push_async_callback(_cancel_and_wait, sweep_task)
            # The check's answers are what opens are refused by, for as long as a period.
            self._key_states = KeyStates(repository, s.revocation_check_s)
            revoker = Revoker(self._holders, self._key_states, self.metrics, s.revocation_check_s)
            revoke_task = watched(
                revoker.run(),
                "gateway-revocation",
                within=stale_after(s.revocation_check_s, s.io_timeout_s),
            )
            stack.push_async_callback(_cancel_and_wait, revoke_task)
            self._leases = Leases(
                redis,
                self.wire,
                cap=s.max_connections_per_tenant,
                lease_s=s.connection_lease_s,
            )
            # Closed after the server (its connections' leases dropped), before Redis.
            stack.push_async_callback(self._leases.aclose)
            lease_task = watched(
                self._leases.run(),
                "gateway-leases",
                # A renewal is a script call per batch of tenants; a few, as a rule.
                within=stale_after(s.connection_lease_s / 3, s.io_timeout_s, calls=3),
            )
            stack.push_async_callback(_cancel_and_wait, lease_task)
            try:
                async with asyncio.timeout(s.start_timeout_s):
                    await until_stopped(stop, self.hub.subscribed(), "Redis pub/sub")
            except TimeoutError:
                raise StartTimeout(
                    "Redis pub/sub: could not subscribe within the start "
                    f"timeout (LONGHAUL_START_TIMEOUT_S): {self.hub.last_error}"
                ) from None
            with listening(s.gateway_host, s.gateway_port, "LONGHAUL_GATEWAY_HOST/_PORT"):
                server = await serve(
                    self._handle,
                    s.gateway_host,
                    s.gateway_port,
                    # websockets' own checks, the origin's included, run in
                    # _process_request too, before the token is spent (refusals.py).
                    origins=[*self.origins, None] if s.allow_missing_origin else list(self.origins),
                    process_request=self._process_request,
                    max_size=s.max_frame_bytes,
                    ping_interval=s.ping_interval_s,
                    ping_timeout=s.ping_timeout_s,
                    # The handshake deadline is the connection class's: open_timeout
                    # would also cut an SSE stream, served from process_request.
                    open_timeout=None,
                    create_connection=connection_class(
                        s.handshake_timeout_s, self._connection_lost
                    ),
                    close_timeout=s.close_timeout_s,
                    # Clients send tiny frames and we send small JSON: compression would cost
                    # memory per connection (zlib contexts) for nothing.
                    compression=None,
                )
            self._server = server
            stack.push_async_callback(self._close_server, server)
            self.port = int(server.sockets[0].getsockname()[1])
            log.info("gateway listening", extra={"host": s.gateway_host, "port": self.port})
            yield self

    async def _close_server(self, server: Server) -> None:
        """Close clients with 1001, end SSE streams, and wait for their handlers, bounded
        in time."""
        self._closing = True
        for stream in self._streams:
            stream.stop()
        server.close()  # stops accepting; 1001 to open connections; idempotent
        if await self._closed_within(server):
            log.info("gateway closed")
            return
        # A client that does not read never lets a close frame drain: drop it. All of
        # them, not server.connections: those are the OPEN ones, and one whose 1001
        # waits to drain is CLOSING. SSE streams are in neither (still in their
        # handshake).
        for connection in list(server.all_connections):
            connection.transport.abort()
        for stream in self._streams:
            stream.abort()
        if await self._closed_within(server):
            log.info("gateway closed")
        else:
            log.warning("gateway closed with connection handlers still running")

    async def _closed_within(self, server: Server) -> bool:
        """Whether the server's connections and their handlers are done in time (a
        handler's own close of a client may take close_timeout_s)."""
        try:
            async with asyncio.timeout(self.settings.close_timeout_s + 1):
                await server.wait_closed()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ handshake

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        try:
            response = await self._route(connection, request)
        except MultipleValuesError as exc:
            # A header given twice where one is meant (Origin, Authorization,
            # Last-Event-ID): read before any token is, and the client's mistake, not a
            # 500 and a traceback in the log.
            name = exc.args[0] if exc.args else "a"
            response = problem(400, f"more than one {name} header")
        if response is not None and request.method == "HEAD":
            # The head a GET would get (Content-Length included), or its refusal's: a
            # response to HEAD has no content (RFC 9110, 9.3.2).
            response = dataclasses.replace(response, body=b"")
        return response

    async def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path = url.path
        if path in _OPS_PATHS:
            if (refusal := refusals.wrong_method(request.method, refusals.GET_HEAD)) is not None:
                return refusal
            return await self._ops(path)
        query = parse_qs(url.query)
        if (match := _SSE_PATH.match(path)) is not None:
            if (refusal := refusals.wrong_method(request.method, refusals.GET)) is not None:
                return refusal
            origin = request.headers.get("Origin")
            return await self._sse(connection, request, match.group(1), query, origin)
        if path != WS_PATH:
            return problem(404, f"no route {path}; the WebSocket endpoint is {WS_PATH}")
        # What needs no token first: reading the token spends it.
        if (refusal := refusals.wrong_method(request.method, refusals.GET)) is not None:
            self.metrics.refused.labels(reason="handshake").inc()
            return refusal
        if not origin_allowed(
            request.headers.get("Origin"),
            self.origins,
            allow_missing=self.settings.allow_missing_origin,
        ):
            self.metrics.refused.labels(reason="origin").inc()
            return problem(403, refusals.ORIGIN_403)
        if (refusal := refusals.not_a_handshake(connection.protocol, request)) is not None:
            self.metrics.refused.labels(reason="handshake").inc()
            return refusal
        try:
            self.registry.check_room()
        except Refused as exc:
            self.metrics.refused.labels(reason="capacity").inc()
            return problem(503, exc.message, {"Retry-After": "5"})
        token = query.get("token", [""])[0]
        # Also a key sent as to the REST API: this endpoint reads no header, so say why.
        if refusals.is_api_key(token or _bearer(request)):
            self.metrics.refused.labels(reason="token").inc()
            return problem(401, refusals.API_KEY_401)
        try:
            grant = await self._redeem_token(token)
        except DependencyDown:
            self.metrics.refused.labels(reason="dependency").inc()
            return problem(503, _STORE_DOWN_503, {"Retry-After": "1"})
        if grant is None or grant.task_id is not None:
            self.metrics.refused.labels(reason="token").inc()
            return problem(401, _REFUSED_401 if grant is None else _WS_REFUSES_TASK_TOKENS)
        if (refusal := await self._key_refusal(token, grant, {})) is not None:
            reason = "token" if refusal.status_code == 401 else "dependency"
            self.metrics.refused.labels(reason=reason).inc()
            return refusal
        tenant_id = grant.tenant_id
        try:
            await self._lease(connection, tenant_id)
        except Refused as exc:
            self.metrics.refused.labels(reason="tenant_capacity").inc()
            return await self._refuse(problem(429, exc.message, {"Retry-After": "5"}), token, grant)
        except DependencyDown:
            self.metrics.refused.labels(reason="dependency").inc()
            return await self._refuse(
                problem(503, _STORE_DOWN_503, {"Retry-After": "1"}), token, grant
            )
        self._admitted[connection] = (tenant_id, grant.key_id)
        return None

    async def _redeem_token(self, token: str) -> wstokens.Grant | None:
        """What the token opens, or None for a bad, expired or used token. Raises
        DependencyDown when Redis cannot tell: a client must not take an outage for a
        refusal of its token."""
        assert self._redis is not None
        try:
            return await wstokens.redeem(self._redis, self.wire, token)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("token check failed: Redis unavailable", extra={"error": repr(exc)})
            raise DependencyDown(f"Redis: {exc!r}") from exc

    async def _refuse(self, response: Response, token: str, grant: wstokens.Grant) -> Response:
        """``response``, a refusal after the token was spent, with the token given back:
        the client's retry of what it can wait out (a cap, an outage) needs no new
        token. An outage may keep it: then it was spent, as before."""
        assert self._redis is not None
        try:
            await wstokens.give_back(self._redis, self.wire, token, grant)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("token not given back: Redis unavailable", extra={"error": repr(exc)})
        return response

    async def _lease(self, connection: ServerConnection, tenant_id: UUID) -> None:
        """A place for the connection under the tenant's cap, in this process and across
        gateways, given back when the connection goes. Raises Refused at a cap, and
        DependencyDown when Redis cannot tell."""
        assert self._leases is not None and isinstance(connection, DeadlineConnection)
        self.registry.check_room(tenant_id)  # this process alone: no Redis needed
        try:
            lease = await self._leases.take(tenant_id)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("connection lease failed: Redis unavailable", extra={"error": repr(exc)})
            raise DependencyDown(f"Redis: {exc!r}") from exc
        if lease is None:
            raise Refused("too_many_connections", "this tenant is at its connection limit")
        if connection.transport.is_closing():  # the client left while we asked
            self._leases.drop(lease)
        else:
            self._lease_of[connection] = lease

    def _connection_lost(self, connection: DeadlineConnection) -> None:
        lease = self._lease_of.pop(connection, None)
        if lease is not None and self._leases is not None:
            self._leases.drop(lease)

    async def _ops(self, path: str) -> Response:
        if path == "/healthz":
            ok, body = self.liveness.report()
            return json_response(200 if ok else 503, body)
        if path == "/readyz":
            return await self._readyz()
        return respond(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    async def _readyz(self) -> Response:
        """The same body as the other services' (shared.health), and the hub's own
        subscription to Redis: without it no live event reaches a client. A stopping
        gateway says so, as the API does: taken out of rotation while it serves on."""
        assert self._readiness is not None
        if self._stop is not None and self._stop.is_set():
            return json_response(503, {"status": "stopping"})
        ok, body = await self._readiness()
        return json_response(200 if ok else 503, body)

    def _readiness_checks(self, redis: Redis, repository: TaskRepository, hub: Hub) -> Readiness:
        async def pubsub() -> None:
            if not hub.connected.is_set():
                raise ConnectionError("resubscribing")

        return Readiness(
            {"postgresql": repository.ping, "redis": redis.ping, "redis_pubsub": pubsub},
            answer_within=self.settings.ready_timeout_s,
            check_timeout=self.settings.io_timeout_s,
        )

    # ------------------------------------------------------------------ SSE

    async def _sse(
        self,
        connection: ServerConnection,
        request: Request,
        raw_id: str,
        query: dict[str, list[str]],
        origin: str | None,
    ) -> Response:
        assert self._deps is not None
        # Plain HTTP from here on, never a WebSocket: websockets stops reading the client
        # (an EOF or stray bytes would end its output), and the handshake deadline is
        # over (the request is in; what follows is bounded by our own I/O timeouts).
        assert isinstance(connection, DeadlineConnection)
        connection.plain_http = True
        if not origin_allowed(
            origin, self.origins, allow_missing=self.settings.allow_missing_origin
        ):
            return problem(403, refusals.ORIGIN_403)
        cors = {"Access-Control-Allow-Origin": origin} if origin else {}
        try:
            # As for a WebSocket: the process's cap before the token is spent.
            self.registry.check_room()
        except Refused as exc:
            return problem(503, exc.message, {**cors, "Retry-After": "5"})
        # What needs no token is checked before the token is spent (it is single-use).
        after = sse.parse_last_event_id(
            request.headers.get("Last-Event-ID"), query.get("last_event_id", [None])[0]
        )
        try:
            task_id = UUID(raw_id)
        except ValueError:
            return problem(404, "no such task", cors)
        if after is None:
            return problem(400, "Last-Event-ID must be a seq (an integer >= 0)", cors)
        token = _bearer(request) or query.get("token", [""])[0]
        grant = await self._sse_grant(token, task_id, cors)
        if isinstance(grant, Response):
            return grant
        tenant_id = grant.tenant_id
        try:
            await self._lease(connection, tenant_id)
        except Refused as exc:
            return await self._refuse(
                problem(429, exc.message, {**cors, "Retry-After": "5"}), token, grant
            )
        except DependencyDown:
            return await self._refuse(
                problem(503, _STORE_DOWN_503, {**cors, "Retry-After": "1"}), token, grant
            )
        stream = sse.Stream(self._deps, tenant_id, task_id, after, self.settings.sse_heartbeat_s)
        self._streams.add(stream)
        if grant.key_id is not None:
            self._holders.add(grant.key_id, stream)
        if self._closing:
            stream.stop()  # still served what it asked for, then ended
        try:
            try:
                await stream.open()
            except sse.NotFound:
                # Spent: one token probes one task id.
                return problem(404, "no such task", cors)
            except sse.Ended:
                # 204 tells an EventSource to stop reconnecting: the stream is over.
                return respond(204, b"", "", cors)
            except DependencyDown:
                return await self._refuse(
                    problem(503, _DB_DOWN_503, {**cors, "Retry-After": "1"}), token, grant
                )
            except Refused as exc:  # lost a race for the last place since the check
                return await self._refuse(
                    problem(503, exc.message, {**cors, "Retry-After": "5"}), token, grant
                )
            try:
                await stream.serve(connection, cors, chunked=request.protocol != "HTTP/1.0")
            except DependencyDown as exc:
                log.warning("SSE stream cut: dependency down", extra={"error": str(exc)})
        finally:
            stream.close()
            self._streams.discard(stream)
            if grant.key_id is not None:
                self._holders.discard(grant.key_id, stream)
        # The connection is closed: websockets sends nothing more (it answers only a
        # connection still in its handshake), and this response goes nowhere.
        return respond(200, b"", "text/event-stream")

    async def _sse_grant(
        self, token: str, task_id: UUID, cors: dict[str, str]
    ) -> wstokens.Grant | Response:
        """What the token opens for this task's stream, or the refusal to answer."""
        if refusals.is_api_key(token):
            return problem(401, refusals.API_KEY_401, cors)
        try:
            grant = await self._redeem_token(token)
        except DependencyDown:
            return problem(503, _STORE_DOWN_503, {**cors, "Retry-After": "1"})
        if grant is None:
            return problem(401, _REFUSED_401, cors)
        if grant.task_id not in (None, task_id):
            return problem(401, "this token opens another task's events", cors)
        return await self._key_refusal(token, grant, cors) or grant

    async def _key_refusal(
        self, token: str, grant: wstokens.Grant, cors: dict[str, str]
    ) -> Response | None:
        """The refusal of a token whose API key is revoked (401) or cannot be read now
        (503, the token given back), or None. A token issued before the revocation is
        refused once the gateway knows of it (keystates.py); a task token's every
        reconnect asks, mostly of what is known already."""
        assert self._key_states is not None
        if grant.key_id is None:
            return None
        try:
            active = await self._key_states.key_active(grant.key_id)
        except ANY_PG_ERROR:
            return await self._refuse(
                problem(503, _DB_DOWN_503, {**cors, "Retry-After": "1"}), token, grant
            )
        return None if active else problem(401, _REVOKED, cors)

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        assert self._deps is not None
        # Unpacked at once: the handler keeps the two values, not the tuple.
        tenant_id, key_id = self._admitted.pop(ws, (None, None))
        if tenant_id is None:  # cannot happen: process_request admitted it
            await ws.close(1011, "no tenant")
            return
        session = Session(ws, tenant_id, self._deps)
        try:
            self.registry.open(session, tenant_id)
        except Refused as exc:
            # Lost a race for the last slot since the handshake check.
            await ws.close(1013, exc.message)
            return
        # No await until run() has started: a stop() before it would go unseen.
        if key_id is not None:
            key_id = self._holders.add(key_id, session)
        try:
            await session.run()
        finally:
            self.registry.close(session)
            # No longer held, yet not given back: the key's revocation stopped it.
            revoked = key_id is not None and not self._holders.discard(key_id, session)
        if revoked:
            # 1008 as for a client too slow to read: a client that reconnects after a
            # while has its new token refused by the API (the key is revoked there too).
            await session.close(CloseCode.POLICY_VIOLATION, _REVOKED)


def _bearer(request: Request) -> str:
    """The credentials of an ``Authorization: Bearer`` header, or ""."""
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else ""


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    # What it raised, if it failed before, was told by essential() and failed the stop.
    await asyncio.gather(task, return_exceptions=True)
