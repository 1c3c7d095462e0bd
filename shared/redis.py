"""Redis plumbing: one client per process, every call under a timeout, and a command
retried once on a fresh connection only where that cannot run it twice: it was certainly
not sent, or its caller declared it harmless to repeat (``idempotent()``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, KeyT, ScriptTextT

from shared.db import redacted
from shared.errors import ConfigError

# Connections a process keeps to Redis. Past them a call waits for a free one (at most
# the call's timeout): redis-py's default pool raises at once past 100, which a burst of
# WebSocket subscribes or API requests reaches.
MAX_CONNECTIONS = 64

# Set on a connection error raised before the command's first byte was written.
_NOT_SENT = "longhaul_not_sent"


def _not_sent(error: BaseException) -> bool:
    return bool(getattr(error, _NOT_SENT, False))


# True inside idempotent(): read where redis-py decides on a retry, so it follows the
# task awaiting the command, whichever pooled connection it runs on.
_IDEMPOTENT: ContextVar[bool] = ContextVar("longhaul_redis_idempotent", default=False)


@contextlib.contextmanager
def idempotent() -> Iterator[None]:
    """Declares the Redis commands awaited in this block harmless to run twice: after
    any connection error each is retried once on a fresh connection, even if it may have
    been sent (by a client of create_client; others ignore this). A pooled connection
    whose server vanished without closing it (a failover, a restart the client has not
    seen yet) then costs no failed call. The retry runs within the call's deadline; a
    timeout is still not retried (see create_client)."""
    token = _IDEMPOTENT.set(True)
    try:
        yield
    finally:
        _IDEMPOTENT.reset(token)


def _retryable(error: BaseException) -> bool:
    return _not_sent(error) or _IDEMPOTENT.get()


class _MarksNotSent(AbstractConnection):
    """Marks the errors of connecting and of the health-check PING, which come before
    the command is written: those are retried for every command. After a write the
    command may have run, and running a script or an INCR again is not harmless: then
    only a command run under ``idempotent()`` is retried."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        try:
            await super().connect_check_health(check_health, retry_socket_connect)
        except RedisConnectionError as error:
            setattr(error, _NOT_SENT, True)
            raise

    async def check_health(self) -> None:
        try:
            await super().check_health()  # type: ignore[no-untyped-call, unused-ignore]
        except RedisConnectionError as error:
            setattr(error, _NOT_SENT, True)
            raise


_marking: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _marking_class(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    # The URL picks the class (TCP, TLS, Unix socket); the mixin goes on top of it.
    if cls not in _marking:
        _marking[cls] = type(f"Longhaul{cls.__name__}", (_MarksNotSent, cls), {})
    return _marking[cls]


@contextlib.asynccontextmanager
async def _deadline(timeout: float, what: object) -> AsyncIterator[None]:
    """The block ends within ``timeout``, else raises Redis' own TimeoutError, which
    callers handle; a command cancelled in it has its connection closed (redis-py)."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            yield
    except TimeoutError:
        if not deadline.expired():
            raise
        raise RedisTimeoutError(f"Redis did not answer {what!s} within {timeout:g} s") from None


class _Script(AsyncScript):
    """Its call (EVALSHA, or for a script Redis lost, EVALSHA, SCRIPT LOAD and EVALSHA
    again) ends within the client's timeout as a whole, as a command does. Each of the
    three still follows the retry rules (create_client)."""

    registered_client: _Client

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: Redis | RedisCluster | None = None,
    ) -> Any:
        async with _deadline(self.registered_client.call_timeout, "a script"):
            return await super().__call__(keys, args, client)


class _Pipeline(Pipeline):
    """Its execute() ends within the client's timeout as a whole, its wait for a pooled
    connection included, as a command does. It follows the retry rules already (the
    connection's Retry)."""

    call_timeout: float

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        async with _deadline(self.call_timeout, "a pipeline"):
            return await super().execute(raise_on_error)  # type: ignore[no-any-return, unused-ignore]


class _Client(Redis):
    """A command ends within ``call_timeout`` as a whole, its retry included (an
    idempotent one's too): waiting for a pooled connection, connecting, a retry and the
    reply each had their own timeout, which added up to several times it against a hung
    Redis. So do a pipeline's execute() and a script's call, which are several commands
    or steps each with a timeout of its own."""

    call_timeout: float

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        async with _deadline(self.call_timeout, args[0]):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call, unused-ignore]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.call_timeout = self.call_timeout
        return pipe

    # The async client's register_script returns an AsyncScript; a sync base of it
    # declares a Script.
    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        return _Script(self, script)


def create_client(url: str, timeout: float, max_connections: int = MAX_CONNECTIONS) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=15,
        # One quick retry, on the same connection object reconnected, where the command
        # was certainly not sent (a refused connect, a failed health check) or after any
        # connection error under idempotent(). Never after a timeout, idempotent or not:
        # the socket's timeout is as long as the call's deadline, which started earlier,
        # so no time would be left for a retry.
        retry=Retry(
            ExponentialBackoff(cap=0.05, base=0.01),
            retries=1,
            supported_errors=(RedisConnectionError,),
            is_retryable=_retryable,
        ),
    )
    pool.connection_class = _marking_class(pool.connection_class)
    # The client owns the pool: closing it closes the connections.
    client = cast(_Client, _Client.from_pool(pool))
    client.call_timeout = timeout
    return client


async def ping(client: Redis, url: str) -> None:
    """A start's check that Redis answers. A password or a database number it refuses is
    a ConfigError: waiting does not mend LONGHAUL_REDIS_URL (a start waited its whole
    timeout, then called Redis unreachable). So is a user whose ACL refuses PING."""
    try:
        await client.ping()
    except NoPermissionError as exc:
        raise refused(url, "PING", exc) from None
    except AuthenticationError as exc:
        raise ConfigError(
            f"Redis at {redacted(url)} refused the login ({exc}): check the user and password"
            " in LONGHAUL_REDIS_URL"
        ) from None
    except ResponseError as exc:
        if "DB index is out of range" not in str(exc):
            raise
        raise ConfigError(
            f"Redis at {redacted(url)} has no such database ({exc}): the number that ends"
            " LONGHAUL_REDIS_URL"
        ) from None


def refused(url: str, command: str, reason: object) -> ConfigError:
    """A command Redis refuses the user of ``url`` (NOPERM): its ACL is to fix, and no
    wait mends it."""
    return ConfigError(
        f"Redis at {redacted(url)} refused {command} to the user of LONGHAUL_REDIS_URL"
        f" ({reason}): its ACL must allow it"
    )
