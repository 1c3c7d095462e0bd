"""Deleting a namespace: what of it exists, and removing it.

A namespace is its RabbitMQ queues and exchanges (those ``Wire.queues`` and
``Wire.exchanges`` name: all that ``amqp.declare`` declares), its Redis keys (every key
under ``Wire.redis_prefix``: event streams, WebSocket tokens, rate buckets, the
gateways' connection leases; pub/sub channels hold nothing to delete) and a PostgreSQL
database, dropped only on request. ``longhaul namespace delete`` runs it; the tests and
the benchmark clean up after themselves with the same functions.

What is in use is refused unless forced: a queue with a consumer or ready messages, and,
with the database to drop, its other sessions and the work it still holds (tasks not
finished, outbox rows not yet published). The survey looks first; then each queue is
looked at again, on a channel of its own, just before it is deleted. RabbitMQ's own
guard (``queue.delete`` with if-unused/if-empty) would close the last gap, but quorum
queues do not implement it: RabbitMQ 3.10 answers NOT_IMPLEMENTED and closes the
connection. So a message published, or a consumer attached, between that last look and
the delete (one round trip) is deleted with the queue: stop the namespace's processes
first."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import amqp
from shared.db import ANY_PG_ERROR, redacted
from shared.errors import DependencyError, Refused
from shared.redis import create_client, idempotent
from shared.schemas import TaskState
from shared.settings import CommonSettings
from shared.wire import Wire

# Keys one SCAN step looks at, and one UNLINK removes: no single command holds Redis
# for long (KEYS would, for the whole keyspace).
KEY_BATCH = 1000

T = TypeVar("T")

# The most rows the survey counts of a table: a count stops there, so a large table does
# not hold the survey for long; "at least" says so.
COUNT_CAP = 10_000

# The states of a task not finished: work the database still holds.
UNFINISHED = tuple(sorted(state.value for state in TaskState if not state.terminal))

# PostgreSQL's own databases: never dropped, whatever LONGHAUL_DATABASE_URL names.
_SYSTEM_DATABASES = frozenset({"postgres", "template0", "template1"})


@dataclass(frozen=True)
class Queue:
    name: str
    # Ready messages. A quorum queue counts whoever holds unacked messages as a
    # consumer (a basic.get not yet acked too), so those show as consumers.
    messages: int
    consumers: int


@dataclass(frozen=True)
class Database:
    name: str
    exists: bool
    sessions: int = 0  # client sessions other than the survey's own
    longhaul: bool = False  # holds Longhaul's schema_migrations table
    # Work dropping it would lose, counted up to COUNT_CAP: tasks not finished (queued,
    # running or retrying) and outbox rows (messages not yet published: due, delayed,
    # or in a retry's backoff). Counted only in a Longhaul database.
    tasks: int = 0
    outbox: int = 0


@dataclass(frozen=True)
class Survey:
    """What exists of a namespace: None (a queue) or False (an exchange) where absent."""

    namespace: str
    queues: dict[str, Queue | None]
    exchanges: dict[str, bool]
    keys: int
    database_name: str
    # None: not looked at, since it is left alone.
    database: Database | None


@dataclass(frozen=True)
class Deleted:
    queues: int
    messages: int  # those the deleted queues held
    exchanges: int
    keys: int
    database: str | None  # the one dropped


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _counted(count: int, noun: str) -> str:
    """A count of rows the survey stopped counting at COUNT_CAP."""
    return f"at least {_n(count, noun)}" if count >= COUNT_CAP else _n(count, noun)


def _work(db: Database) -> list[str]:
    return [
        _counted(db.tasks, "unfinished task"),
        _counted(db.outbox, "unpublished outbox row"),
    ]


def busy(queue: Queue) -> str | None:
    """What holds ``queue`` in use, as the refusal names it, or None. Pure."""
    if not (queue.consumers or queue.messages):
        return None
    held = [
        _n(queue.consumers, "consumer") if queue.consumers else "",
        f"{_n(queue.messages, 'message')} ready" if queue.messages else "",
    ]
    return f"queue {queue.name} has {' and '.join(h for h in held if h)}"


_HOW_TO_GO_ON = "Stop its processes and let its queues drain, or give --force to delete it anyway"


def describe(survey: Survey) -> list[str]:
    """What the deletion would remove (or leave alone), a line each. Pure."""
    lines = []
    for name, queue in survey.queues.items():
        if queue is None:
            lines.append(f"queue {name}: absent")
        else:
            ready = _n(queue.messages, "message")
            lines.append(f"queue {name}: {ready} ready, {_n(queue.consumers, 'consumer')}")
    for name, exists in survey.exchanges.items():
        lines.append(f"exchange {name}" if exists else f"exchange {name}: absent")
    lines.append(f"redis: {_n(survey.keys, 'key')} under {survey.namespace}:")
    db = survey.database
    if db is None:
        lines.append(f"database {survey.database_name}: left alone (--drop-database drops it)")
    elif not db.exists:
        lines.append(f"database {db.name}: absent")
    else:
        held = ", ".join([_n(db.sessions, "other session"), *_work(db)])
        lines.append(f"database {db.name}: to be dropped ({held})")
    return lines


def summary(namespace: str, done: Deleted) -> list[str]:
    """What the deletion removed, a line each. Pure."""
    lines = [
        f"deleted {_n(done.queues, 'queue')} ({_n(done.messages, 'message')}),"
        f" {_n(done.exchanges, 'exchange')} and {_n(done.keys, 'Redis key')}"
        f" of namespace {namespace}"
    ]
    if done.database is not None:
        lines.append(f"dropped database {done.database}")
    return lines


def refusal(survey: Survey, *, force: bool) -> str | None:
    """Why the deletion must not go ahead, in one line, or None. ``force`` overrides
    what is in use (consumers, messages, sessions, the database's unfinished tasks and
    outbox rows), not a database that is not Longhaul's. Pure."""
    db = survey.database
    if db is not None and db.exists:
        if db.name in _SYSTEM_DATABASES:
            return f"database {db.name} is PostgreSQL's own: leave out --drop-database"
        if not db.longhaul:
            return (
                f"database {db.name} holds no Longhaul schema (no schema_migrations table):"
                " not dropping it; leave out --drop-database"
            )
    if force:
        return None
    in_use = [why for queue in survey.queues.values() if queue is not None and (why := busy(queue))]
    if db is not None and db.sessions:
        in_use.append(f"database {db.name} has {_n(db.sessions, 'other session')}")
    if db is not None and (db.tasks or db.outbox):
        held = [text for count, text in zip((db.tasks, db.outbox), _work(db), strict=True) if count]
        in_use.append(f"database {db.name} holds {' and '.join(held)}")
    if not in_use:
        return None
    return f"namespace {survey.namespace} is in use: {'; '.join(in_use)}. {_HOW_TO_GO_ON}"


async def survey(settings: CommonSettings, *, database: bool) -> Survey:
    """What exists of the settings' namespace; its database only with ``database``."""
    wire = Wire(settings.namespace)
    timeout = settings.io_timeout_s
    with _unreachable("RabbitMQ", settings.amqp_url):
        connection = await amqp.connect_once(settings.amqp_url, "longhaul-cli", timeout)
        try:
            queues = {name: await _queue(connection, name, timeout) for name in wire.queues}
            exchanges = {
                name: await _exchange(connection, name, timeout) for name in wire.exchanges
            }
        finally:
            await amqp.close(connection, timeout)
    with _unreachable("Redis", settings.redis_url):
        redis = create_client(settings.redis_url, timeout)
        try:
            keys = await count_keys(redis, wire.redis_prefix)
        finally:
            await redis.aclose()
    with _unreachable("PostgreSQL", settings.database_url):
        found = await survey_database(settings.database_url, timeout) if database else None
    return Survey(
        namespace=settings.namespace,
        queues=queues,
        exchanges=exchanges,
        keys=keys,
        database_name=database_name(settings.database_url),
        database=found,
    )


async def delete(settings: CommonSettings, found: Survey, *, force: bool) -> Deleted:
    """Delete the namespace ``found`` describes: its queues and exchanges (every name of
    the namespace: deleting one that is absent is no error), its Redis keys, and its
    database where ``found`` looked at one (that is, --drop-database). Without ``force``,
    a queue found in use when looked at again just before its delete is Refused, and
    nothing after it is deleted."""
    wire = Wire(settings.namespace)
    with _unreachable("RabbitMQ", settings.amqp_url):
        queues, messages = await delete_amqp(
            settings.amqp_url, wire.queues, wire.exchanges, settings.io_timeout_s, force=force
        )
    with _unreachable("Redis", settings.redis_url):
        redis = create_client(settings.redis_url, settings.io_timeout_s)
        try:
            keys = await unlink_keys(redis, wire.redis_prefix)
        finally:
            await redis.aclose()
    dropped = None
    if found.database is not None and found.database.exists:
        with _unreachable("PostgreSQL", settings.database_url):
            await drop_database(
                settings.database_url,
                found.database.name,
                force=force,
                timeout=settings.start_timeout_s,
            )
        dropped = found.database.name
    return Deleted(
        queues=queues,
        messages=messages,
        exchanges=sum(found.exchanges.values()),
        keys=keys,
        database=dropped,
    )


# What the clients raise when their server is unreachable, slow or refusing.
_CLIENT_ERRORS: tuple[type[BaseException], ...] = (AMQPError, RedisError, *ANY_PG_ERROR)


@contextlib.contextmanager
def _unreachable(what: str, url: str) -> Iterator[None]:
    """A client's error as one line naming the dependency and where it was sought."""
    try:
        yield
    except _CLIENT_ERRORS as exc:
        raise DependencyError(f"{what} at {redacted(url)}: {_said(exc)}") from exc


def _said(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# RabbitMQ


async def _queue(connection: AbstractConnection, name: str, timeout: float) -> Queue | None:
    channel = await connection.channel()
    try:
        async with asyncio.timeout(timeout):
            declared = await channel.declare_queue(name, passive=True)
    except ChannelNotFoundEntity:  # the broker closed the channel too
        return None
    finally:
        if not channel.is_closed:
            await channel.close()
    result = declared.declaration_result
    return Queue(name, result.message_count or 0, result.consumer_count or 0)


async def _exchange(connection: AbstractConnection, name: str, timeout: float) -> bool:
    channel = await connection.channel()
    try:
        async with asyncio.timeout(timeout):
            await channel.declare_exchange(name, passive=True)
    except ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def delete_amqp(
    url: str, queues: Sequence[str], exchanges: Sequence[str], timeout: float, *, force: bool
) -> tuple[int, int]:
    """Delete ``queues``, then ``exchanges``, whether they exist or not; the number of
    queues that existed and of the messages they held. Queue first: no exchange is left
    routing to a queue nobody would delete.

    Each look and each delete has a channel of its own: the broker closes the channel of
    a passive declare of an absent queue, and of a delete it refuses, and on a shared
    channel every step after would fail with it. A delete the broker refuses raises its
    AMQPError there (the command's one line, exit 3); what came before it is gone, and
    running it again deletes the rest. Without ``force``, each queue is looked at again
    (a passive declare) just before its delete and Refused if it has a consumer or ready
    messages: see the module's docstring for what that leaves open."""
    connection = await amqp.connect_once(url, "longhaul-cli", timeout)
    try:
        existed = messages = 0
        for name in queues:
            held = await delete_queue(connection, name, timeout, force=force)
            if held is not None:
                existed += 1
                messages += held
        for name in exchanges:
            await _delete_exchange(connection, name, timeout)
    finally:
        await amqp.close(connection, timeout)
    return existed, messages


async def delete_queue(
    connection: AbstractConnection, name: str, timeout: float, *, force: bool
) -> int | None:
    """Delete queue ``name`` after a last look at it; the messages it held, or None if
    it was absent. Without ``force``, one that has a consumer or ready messages is
    Refused and left as it is."""
    queue = await _queue(connection, name, timeout)
    if queue is None:
        return None
    if not force and (why := busy(queue)) is not None:
        raise Refused(f"{why} since the survey: deletion stopped before it. {_HOW_TO_GO_ON}")
    deleted = await _on_own_channel(connection, timeout, lambda ch: ch.queue_delete(name))
    return int(deleted.message_count or 0)


async def _delete_exchange(connection: AbstractConnection, name: str, timeout: float) -> None:
    await _on_own_channel(connection, timeout, lambda channel: channel.exchange_delete(name))


async def _on_own_channel(
    connection: AbstractConnection,
    timeout: float,
    call: Callable[[AbstractChannel], Awaitable[T]],
) -> T:
    channel = await connection.channel()
    try:
        async with asyncio.timeout(timeout):
            return await call(channel)
    finally:
        if not channel.is_closed:
            await channel.close()


# Redis


def key_pattern(prefix: str) -> str:
    """SCAN's MATCH for every key that starts with ``prefix``. Pure."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"


async def _scan(redis: Redis, prefix: str) -> AsyncIterator[list[bytes | str]]:
    """Every key under ``prefix``, a SCAN step at a time. A key present throughout is
    returned at least once (more than once while Redis resizes its table)."""
    cursor = 0
    while True:
        with idempotent():  # a read
            cursor, batch = await redis.scan(cursor, match=key_pattern(prefix), count=KEY_BATCH)
        if batch:
            yield batch
        if cursor == 0:
            return


async def count_keys(redis: Redis, prefix: str) -> int:
    # Counted once each: SCAN may return a key twice.
    return len({key async for batch in _scan(redis, prefix) for key in batch})


async def unlink_keys(redis: Redis, prefix: str) -> int:
    """Remove every key under ``prefix`` (UNLINK: Redis frees them in the background);
    the number removed."""
    removed = 0
    async for batch in _scan(redis, prefix):
        with idempotent():  # a key unlinked twice is gone once
            removed += await redis.unlink(*batch)
    return removed


# PostgreSQL


def database_name(dsn: str) -> str:
    """The database a URL names, as ``ensure_database`` reads it. Pure."""
    return urlsplit(dsn).path.lstrip("/") or "postgres"


async def survey_database(dsn: str, timeout: float) -> Database:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except asyncpg.InvalidCatalogNameError:
        return Database(database_name(dsn), exists=False)
    try:
        # Client sessions only: DROP DATABASE ends autovacuum's workers itself.
        row = await conn.fetchrow(
            "SELECT current_database() AS name,"
            " to_regclass('schema_migrations') IS NOT NULL AS longhaul,"
            " to_regclass('tasks') IS NOT NULL AND to_regclass('outbox') IS NOT NULL AS work,"
            " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            "  AND pid <> pg_backend_pid() AND backend_type = 'client backend') AS sessions",
            timeout=timeout,
        )
        assert row is not None
        found = Database(
            row["name"], exists=True, sessions=row["sessions"], longhaul=row["longhaul"]
        )
        if not (row["longhaul"] and row["work"]):
            return found
        # Counted up to COUNT_CAP each: whether there is any is what the refusal needs.
        work = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = ANY($1::text[])"
            "  LIMIT $2) AS t) AS tasks,"
            " (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $2) AS o) AS outbox",
            list(UNFINISHED),
            COUNT_CAP,
            timeout=timeout,
        )
    finally:
        await conn.close()
    assert work is not None
    return dataclasses.replace(found, tasks=work["tasks"], outbox=work["outbox"])


async def drop_database(server_dsn: str, name: str, *, force: bool, timeout: float) -> None:
    """Drop database ``name`` (if it exists) of the server ``server_dsn`` reaches, from
    its ``postgres`` database. Without ``force``, a database someone is connected to is
    Refused (PostgreSQL refuses it); with it, their sessions are ended."""
    admin = await asyncpg.connect(server_dsn, database="postgres", timeout=timeout)
    quoted = '"' + name.replace('"', '""') + '"'
    try:
        await admin.execute(
            f"DROP DATABASE IF EXISTS {quoted}{' WITH (FORCE)' if force else ''}",
            timeout=timeout,
        )
    except asyncpg.ObjectInUseError as exc:  # someone connected since the survey
        raise Refused(f"database {name}: {exc}; give --force to end its sessions") from None
    finally:
        await admin.close()
