"""``longhaul namespace delete`` against the real RabbitMQ, Redis and PostgreSQL.

Each test makes a namespace of its own and, beside it, a neighbour whose name starts
with the first one's (``<ns>_x``): the deletion takes every queue, exchange and Redis key
of the one, nothing of the other, and a database only when asked."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity
from redis.asyncio import Redis

from shared import amqp, decommission
from shared.db import migrate
from shared.errors import Refused
from shared.settings import CommonSettings
from shared.wire import Wire
from tests.conftest import (
    PG_ADMIN_URL,
    ROOT_ENV,
    Deployment,
    drop_namespace,
    scratch_database,
)
from tests.support import eventually, new_run_id, run_cli


@dataclass
class Namespace:
    """A namespace the test filled: its queues and exchanges declared as the services
    declare them, and Redis keys of every kind the services write."""

    deployment: Deployment
    broker: AbstractConnection
    keys: set[bytes]

    @property
    def name(self) -> str:
        return self.deployment.namespace

    @property
    def wire(self) -> Wire:
        return self.deployment.wire

    async def publish(self, count: int) -> None:
        """``count`` task messages into the normal lane, confirmed by the broker."""
        channel = await self.broker.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.wire.tasks_exchange)
        for _ in range(count):
            await exchange.publish(aio_pika.Message(b"{}"), self.wire.tasks_routing_key)
        await channel.close()

    async def queues(self) -> dict[str, int | None]:
        """Each queue's ready messages, or None where it does not exist."""
        found: dict[str, int | None] = {}
        for name in self.wire.queues:
            channel = await self.broker.channel()
            try:
                declared = await channel.declare_queue(name, passive=True)
                found[name] = declared.declaration_result.message_count
            except ChannelNotFoundEntity:
                found[name] = None
            finally:
                if not channel.is_closed:
                    await channel.close()
        return found

    async def exchanges(self) -> dict[str, bool]:
        found = {}
        for name in self.wire.exchanges:
            channel = await self.broker.channel()
            try:
                await channel.declare_exchange(name, passive=True)
                found[name] = True
            except ChannelNotFoundEntity:
                found[name] = False
            finally:
                if not channel.is_closed:
                    await channel.close()
        return found


async def _filled(dep: Deployment, redis: Redis) -> Namespace:
    broker = await amqp.connect_once(dep.amqp_url, "longhaul-test-namespace-delete", 10)
    channel = await broker.channel()
    await amqp.declare(channel, CommonSettings(namespace=dep.namespace), dep.wire)
    await channel.close()
    wire = dep.wire
    keys = [
        wire.event_stream("t1"),
        wire.ws_token("hash"),
        wire.tenant_connections("tenant"),
        wire.rate_bucket("tenant"),
        f"{wire.redis_prefix}anything:else",
    ]
    await redis.xadd(keys[0], {"e": "{}"}, id="1-0")
    await redis.set(keys[1], "tenant")
    await redis.zadd(keys[2], {"conn": 1})
    await redis.hset(keys[3], mapping={"tokens": 1})
    await redis.set(keys[4], "x")
    return Namespace(dep, broker, {key.encode() for key in keys})


async def _keys(redis: Redis, namespace: str) -> set[bytes]:
    return {key async for key in redis.scan_iter(match=f"{namespace}:*", count=1000)}


@dataclass
class Pair:
    this: Namespace
    neighbour: Namespace


@pytest.fixture
async def pair(deployment: Deployment, redis: Redis) -> AsyncIterator[Pair]:
    """Two filled namespaces, the neighbour's name the first one's plus ``_x``."""
    this = replace(deployment, namespace=f"{deployment.namespace}_{new_run_id()}")
    neighbour = replace(deployment, namespace=f"{this.namespace}_x")
    made: list[Namespace] = []
    try:
        for dep in (this, neighbour):
            made.append(await _filled(dep, redis))
        yield Pair(*made)
    finally:
        for dep in (this, neighbour):
            await drop_namespace(dep, redis)
        for namespace in made:
            await namespace.broker.close()


async def _delete(dep: Deployment, *args: str, **env: str) -> tuple[int, str, str]:
    return await run_cli(
        {**ROOT_ENV, **dep.env(**env)}, "namespace", "delete", dep.namespace, *args
    )


async def _untouched(namespace: Namespace, redis: Redis, messages: int) -> None:
    """Every queue, exchange and key of ``namespace`` is still there."""
    wire = namespace.wire
    assert await namespace.queues() == {
        wire.tasks_queue: messages,
        wire.high_tasks_queue: 0,
        wire.dead_letter_queue: 0,
    }
    assert await namespace.exchanges() == dict.fromkeys(wire.exchanges, True)
    assert await _keys(redis, namespace.name) == namespace.keys


async def _depth(namespace: Namespace, messages: int) -> None:
    """Wait until the broker counts ``messages`` ready in the normal lane."""

    async def counted() -> bool:
        return (await namespace.queues())[namespace.wire.tasks_queue] == messages

    await eventually(counted, what=f"{messages} messages in {namespace.wire.tasks_queue}")


async def test_a_dry_run_lists_queues_with_their_messages_and_the_keys_and_deletes_nothing(
    pair: Pair, redis: Redis
) -> None:
    this = pair.this
    await this.publish(2)
    await _depth(this, 2)
    # Messages wait: refused, unless --force, which a dry run shows but does not apply.
    code, out, err = await _delete(this.deployment)
    assert (code, out) == (1, ""), err
    assert err == (
        f"longhaul: namespace {this.name} is in use: queue {this.wire.tasks_queue} has 2"
        " messages ready. Stop its processes and let its queues drain, or give --force to"
        " delete it anyway\n"
    )
    code, out, err = await _delete(this.deployment, "--force")
    assert (code, err) == (0, "")
    name, database = this.name, this.deployment.database_url.rsplit("/", 1)[1]
    assert out.splitlines() == [
        f"queue {name}.tasks: 2 messages ready, 0 consumers",
        f"queue {name}.tasks.high: 0 messages ready, 0 consumers",
        f"queue {name}.dead: 0 messages ready, 0 consumers",
        f"exchange {name}.tasks",
        f"exchange {name}.dlx",
        f"redis: 5 keys under {name}:",
        f"database {database}: left alone (--drop-database drops it)",
        "dry run: nothing deleted; --yes deletes the above",
    ]
    await _untouched(this, redis, messages=2)
    await _untouched(pair.neighbour, redis, messages=0)


async def test_refused_while_a_consumer_is_attached_and_forced_deletes_anyway(
    pair: Pair, redis: Redis
) -> None:
    this = pair.this
    channel = await this.broker.channel()
    queue = await channel.get_queue(this.wire.tasks_queue, ensure=False)

    async def take(message: AbstractIncomingMessage) -> None:
        await message.ack()

    await queue.consume(take)

    async def attached() -> bool:
        code, _, err = await _delete(this.deployment, "--yes")
        return code == 1 and f"queue {this.wire.tasks_queue} has 1 consumer" in err

    # The broker counts the consumer once its consume is registered.
    await eventually(attached, what="the consumer counted")
    code, out, err = await _delete(this.deployment, "--yes")
    assert (code, out, len(err.splitlines())) == (1, "", 1), err
    await _untouched(this, redis, messages=0)

    code, out, err = await _delete(this.deployment, "--yes", "--force")
    assert code == 0, err
    assert out.splitlines()[-1] == (
        f"deleted 3 queues (0 messages), 2 exchanges and 5 Redis keys of namespace {this.name}"
    )
    assert set((await this.queues()).values()) == {None}
    await _untouched(pair.neighbour, redis, messages=0)


async def test_yes_removes_every_queue_exchange_and_key_and_nothing_of_the_neighbour(
    pair: Pair, redis: Redis, deployment: Deployment
) -> None:
    await pair.neighbour.publish(3)
    await _depth(pair.neighbour, 3)
    this = pair.this
    code, out, err = await _delete(this.deployment, "--yes")
    assert code == 0, err
    assert f"database {deployment.namespace}: left alone (--drop-database drops it)" in out
    assert out.splitlines()[-1] == (
        f"deleted 3 queues (0 messages), 2 exchanges and 5 Redis keys of namespace {this.name}"
    )
    assert await this.queues() == dict.fromkeys(this.wire.queues, None)
    assert await this.exchanges() == dict.fromkeys(this.wire.exchanges, False)
    assert await _keys(redis, this.name) == set()
    await _untouched(pair.neighbour, redis, messages=3)
    assert await _exists(deployment.namespace)  # the run's database, left alone
    # Again: nothing left to delete, and that is no error.
    code, out, err = await _delete(this.deployment, "--yes")
    assert code == 0, err
    assert f"queue {this.wire.tasks_queue}: absent" in out.splitlines()
    assert out.splitlines()[-1] == (
        f"deleted 0 queues (0 messages), 0 exchanges and 0 Redis keys of namespace {this.name}"
    )


async def _exists(name: str) -> bool:
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        return bool(await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await admin.close()


async def _sessions(name: str, count: int) -> None:
    """Wait until database ``name`` has ``count`` client sessions: a closed one's server
    process ends a moment after its client has gone."""

    async def counted() -> bool:
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            found = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND backend_type = 'client backend'",
                name,
            )
        finally:
            await admin.close()
        return bool(found == count)

    await eventually(counted, what=f"{count} sessions on {name}")


async def test_drop_database_refuses_while_connected_and_drops_it_once_not(
    pair: Pair, redis: Redis
) -> None:
    this = pair.this
    async with scratch_database(this.name, create=False) as url:
        dep = replace(this.deployment, database_url=url)
        await migrate(url, timeout=30)
        session = await asyncpg.connect(url)
        try:
            await _sessions(this.name, 1)
            code, out, err = await _delete(dep, "--drop-database", "--yes")
            assert (code, out) == (1, ""), err
            assert err == (
                f"longhaul: namespace {this.name} is in use: database {this.name} has 1 other"
                " session. Stop its processes and let its queues drain, or give --force to"
                " delete it anyway\n"
            )
        finally:
            await session.close()
        await _sessions(this.name, 0)
        # Refused before anything was deleted.
        assert await _exists(this.name)
        await _untouched(this, redis, messages=0)

        code, out, err = await _delete(dep, "--drop-database")
        assert code == 0, err
        assert (
            f"database {this.name}: to be dropped (0 other sessions, 0 unfinished tasks,"
            " 0 unpublished outbox rows)"
        ) in out.splitlines()
        assert await _exists(this.name)

        code, out, err = await _delete(dep, "--drop-database", "--yes")
        assert code == 0, err
        assert out.splitlines()[-1] == f"dropped database {this.name}"
        assert not await _exists(this.name)
        assert await this.queues() == dict.fromkeys(this.wire.queues, None)
        await _untouched(pair.neighbour, redis, messages=0)


async def test_drop_database_refuses_while_tasks_and_outbox_rows_are_left_in_it(
    pair: Pair, redis: Redis
) -> None:
    """Every process stopped, no session left: a task still queued and its outbox row
    (not yet published) are work the drop would lose, refused unless forced."""
    this = pair.this
    async with scratch_database(this.name, create=False) as url:
        dep = replace(this.deployment, database_url=url)
        await migrate(url, timeout=30)
        session = await asyncpg.connect(url)
        try:
            tenant, task = uuid.uuid4(), uuid.uuid4()
            await session.execute("INSERT INTO tenants (id, name) VALUES ($1, 't')", tenant)
            await session.execute(
                "INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts, timeout_s)"
                " VALUES ($1, $2, 'echo', '{}', 'queued', 3, 30)",
                task,
                tenant,
            )
            # A finished task is no work left.
            await session.execute(
                "INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts, timeout_s)"
                " VALUES ($1, $2, 'echo', '{}', 'succeeded', 3, 30)",
                uuid.uuid4(),
                tenant,
            )
            await session.execute(
                "INSERT INTO outbox (task_id, attempt, body, available_at)"
                " VALUES ($1, 1, '\\x7b7d', now() + interval '1 hour')",
                task,
            )
        finally:
            await session.close()
        await _sessions(this.name, 0)
        code, out, err = await _delete(dep, "--drop-database", "--yes")
        assert (code, out) == (1, ""), err
        assert err == (
            f"longhaul: namespace {this.name} is in use: database {this.name} holds 1"
            " unfinished task and 1 unpublished outbox row. Stop its processes and let its"
            " queues drain, or give --force to delete it anyway\n"
        )
        assert await _exists(this.name)
        await _untouched(this, redis, messages=0)
        # The dry run lists them, and --force drops them with the database.
        code, out, err = await _delete(dep, "--drop-database", "--force")
        assert code == 0, err
        assert (
            f"database {this.name}: to be dropped (0 other sessions, 1 unfinished task,"
            " 1 unpublished outbox row)"
        ) in out.splitlines()
        code, out, err = await _delete(dep, "--drop-database", "--yes", "--force")
        assert code == 0, err
        assert out.splitlines()[-1] == f"dropped database {this.name}"
        assert not await _exists(this.name)


async def test_a_queue_in_use_since_the_survey_is_not_deleted_unless_forced(
    pair: Pair, redis: Redis
) -> None:
    """A message published between the survey and the delete: the queue is looked at
    again just before its delete, refused, and left with its message."""
    this = pair.this
    dep = this.deployment
    settings = CommonSettings(
        namespace=this.name,
        amqp_url=dep.amqp_url,
        redis_url=dep.redis_url,
        database_url=dep.database_url,
    )
    found = await decommission.survey(settings, database=False)
    assert decommission.refusal(found, force=False) is None
    await this.publish(1)
    await _depth(this, 1)
    with pytest.raises(Refused) as refused:
        await decommission.delete(settings, found, force=False)
    assert str(refused.value) == (
        f"queue {this.wire.tasks_queue} has 1 message ready since the survey: deletion"
        " stopped before it. Stop its processes and let its queues drain, or give --force"
        " to delete it anyway"
    )
    await _untouched(this, redis, messages=1)
    # Each look and delete on a channel of its own: an absent queue's passive declare
    # (the broker closes that channel) fails nothing after it.
    done = await decommission.delete(settings, found, force=True)
    assert (done.queues, done.messages) == (3, 1)
    assert await this.queues() == dict.fromkeys(this.wire.queues, None)
    done = await decommission.delete(settings, found, force=False)
    assert (done.queues, done.messages, done.keys) == (0, 0, 0)
    await _untouched(pair.neighbour, redis, messages=0)


async def test_a_queue_with_a_consumer_since_the_survey_is_refused_by_the_last_look(
    pair: Pair,
) -> None:
    this = pair.this
    channel = await this.broker.channel()
    queue = await channel.get_queue(this.wire.high_tasks_queue, ensure=False)

    async def take(message: AbstractIncomingMessage) -> None:
        await message.ack()

    await queue.consume(take)
    high = this.wire.high_tasks_queue

    async def counted() -> bool:
        probe = await this.broker.channel()
        try:
            declared = await probe.declare_queue(high, passive=True)
            return declared.declaration_result.consumer_count == 1
        finally:
            await probe.close()

    # The broker counts the consumer once its consume is registered.
    await eventually(counted, what="the consumer counted")
    connection = await amqp.connect_once(this.deployment.amqp_url, "longhaul-test", 10)
    try:
        with pytest.raises(Refused) as refused:
            await decommission.delete_queue(connection, high, 10, force=False)
        assert str(refused.value).startswith(f"queue {high} has 1 consumer since the survey")
        assert (await this.queues())[high] == 0
        # An absent queue is no error, and nothing to count.
        absent = f"{this.name}.absent"
        assert await decommission.delete_queue(connection, absent, 10, force=False) is None
    finally:
        await connection.close()
        await channel.close()


async def test_drop_database_with_force_ends_the_sessions(pair: Pair) -> None:
    this = pair.this
    async with scratch_database(this.name, create=False) as url:
        await migrate(url, timeout=30)
        session = await asyncpg.connect(url)
        try:
            dep = replace(this.deployment, database_url=url)
            code, out, err = await _delete(dep, "--drop-database", "--yes", "--force")
            assert code == 0, err
            assert out.splitlines()[-1] == f"dropped database {this.name}"
            assert not await _exists(this.name)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await session.fetchval("SELECT 1")
        finally:
            with contextlib.suppress(Exception):
                await session.close()


async def test_a_database_without_longhauls_schema_is_never_dropped(pair: Pair) -> None:
    this = pair.this
    async with scratch_database(this.name, create=True) as url:
        dep = replace(this.deployment, database_url=url)
        code, out, err = await _delete(dep, "--drop-database", "--yes", "--force")
        assert (code, out) == (1, ""), err
        assert err == (
            f"longhaul: database {this.name} holds no Longhaul schema (no schema_migrations"
            " table): not dropping it; leave out --drop-database\n"
        )
        assert await _exists(this.name)


@pytest.mark.parametrize(
    ("setting", "url", "says"),
    [
        (
            "amqp_url",
            "amqp://guest:guest@127.0.0.1:1/",
            "RabbitMQ at amqp://guest:***@127.0.0.1:1/",
        ),
        ("redis_url", "redis://127.0.0.1:1/0", "Redis at redis://127.0.0.1:1/0"),
    ],
)
async def test_an_unreachable_dependency_is_one_line_and_exit_3(
    pair: Pair, redis: Redis, setting: str, url: str, says: str
) -> None:
    code, out, err = await _delete(pair.this.deployment, "--yes", **{setting: url})
    assert (code, out, len(err.splitlines())) == (3, "", 1), err
    assert err.startswith(f"longhaul: {says}: "), err
    await _untouched(pair.this, redis, messages=0)


async def test_the_namespace_is_named_as_configured(pair: Pair, redis: Redis) -> None:
    """Not the default one where LONGHAUL_NAMESPACE is unset."""
    dep = pair.this.deployment
    env = {k: v for k, v in {**ROOT_ENV, **dep.env()}.items() if k != "LONGHAUL_NAMESPACE"}
    code, out, err = await run_cli(env, "namespace", "delete", dep.namespace, "--yes")
    assert (code, out) == (2, ""), err
    assert err == (
        f"longhaul: {dep.namespace} is not this environment's namespace"
        " (LONGHAUL_NAMESPACE=longhaul): set LONGHAUL_NAMESPACE and the URLs of the"
        " deployment to delete\n"
    )
    await _untouched(pair.this, redis, messages=0)
