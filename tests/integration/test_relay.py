"""The outbox relay against the real PostgreSQL, RabbitMQ (confirm channel) and Redis.

Tasks and outbox rows are written by ApiRepository.insert, the API's own path. Each test
publishes to a queue of its own namespace, so nothing reaches the run's workers; the
relay may also publish rows other tests left due, so assertions name our task ids."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aio_pika
import aiormq
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from redis.asyncio import Redis

from services.api.repository import ApiRepository, NewTask
from services.worker.repository import WorkerRepository
from shared import amqp
from shared.amqp import Outgoing, Published, Publisher
from shared.db import create_pool
from shared.decommission import delete_amqp, unlink_keys
from shared.errors import DependencyError
from shared.events import EventSink
from shared.failpoints import Failpoints
from shared.ids import uuid7
from shared.relay import ORPHAN_AFTER_S, OWNER_LOCK_CLASS, Handed, OutboxRelay
from shared.schemas import TaskMessage, TaskRequest, parse_event, parse_task_message
from shared.settings import CommonSettings
from shared.wire import Wire
from tests.conftest import Deployment, Isolated, Tenant
from tests.support import eventually, new_run_id, outbox_emptied


@pytest.fixture(scope="module")
async def pool(deployment: Deployment) -> AsyncIterator[asyncpg.Pool]:
    """A pool with the services' JSON codecs (ApiRepository passes args as dicts)."""
    pool = await create_pool(deployment.database_url, max_size=8)
    yield pool
    await pool.close()


@dataclass
class Broker:
    """A private topology (its own namespace) and a confirm channel publishing to it."""

    wire: Wire
    connection: AbstractRobustConnection
    channel: AbstractChannel
    topology: amqp.Topology

    def publisher(self) -> Publisher:
        return Publisher(
            self.channel, self.wire.tasks_exchange, self.wire.tasks_routing_key, timeout=10
        )

    async def drain(self) -> list[TaskMessage]:
        """Every message now in the queue, acked and parsed, in queue order."""
        out = []
        while (message := await self.topology.queue.get(no_ack=True, fail=False)) is not None:
            out.append(parse_task_message(message.body))
        return out

    async def depth(self) -> int:
        declared = await self.channel.declare_queue(self.wire.tasks_queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


@pytest.fixture
async def broker(deployment: Deployment) -> AsyncIterator[Broker]:
    namespace = f"{deployment.namespace}_relay_{new_run_id()}"
    wire = Wire(namespace)
    connection = await amqp.connect(deployment.amqp_url, "longhaul-test-relay", timeout=10)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    settings = CommonSettings(namespace=namespace)
    topology = await amqp.declare(channel, settings, wire)
    try:
        yield Broker(wire, connection, channel, topology)
    finally:
        await connection.close()
        await delete_amqp(deployment.amqp_url, wire.queues, wire.exchanges, timeout=10, force=True)


@pytest.fixture
def sink(redis: Redis, broker: Broker) -> EventSink:
    return EventSink(redis, broker.wire, retention_s=600, maxlen=1000)


@pytest.fixture(autouse=True)
async def clean_redis(redis: Redis, broker: Broker) -> AsyncIterator[None]:
    yield
    await unlink_keys(redis, broker.wire.redis_prefix)


def make_relay(
    pool: asyncpg.Pool,
    publisher: Publisher,
    sink: EventSink,
    deployment: Deployment,
    **kwargs: Any,
) -> OutboxRelay:
    return OutboxRelay(
        pool,
        publisher,
        sink,
        dsn=deployment.database_url,
        failpoints=Failpoints(""),
        timeout=10,
        **kwargs,
    )


async def insert(pool: asyncpg.Pool, tenant: Tenant, n: int = 1, **request: Any) -> list[UUID]:
    tasks = [
        NewTask(id=uuid7(), request=TaskRequest(type="relay.test", **request)) for _ in range(n)
    ]
    rows = await ApiRepository(pool, timeout=10).insert(tenant.id, tasks)
    assert len(rows) == n
    return [t.id for t in tasks]


async def outbox_rows(pool: asyncpg.Pool, ids: Sequence[UUID]) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT task_id, attempt, available_at FROM outbox WHERE task_id = ANY($1::uuid[])",
            list(ids),
        )
    )


async def flush_until_empty(relay: OutboxRelay) -> None:
    while await relay.flush_once():
        pass


@contextlib.asynccontextmanager
async def relay_running(relay: OutboxRelay) -> AsyncIterator[asyncio.Task[None]]:
    """The relay's own loop, stopped (and awaited) on the way out."""
    stop = asyncio.Event()
    loop = asyncio.create_task(relay.run(stop), name="relay")
    try:
        yield loop
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)


async def wait_published(broker: Broker, task_id: UUID, *, within: float, what: str) -> None:
    async def published() -> bool:
        return task_id in {m.task_id for m in await broker.drain()}

    await eventually(published, within=within, interval=0.02, what=what)


class _ClosedOnFetchval:
    """A pool whose connections' first ``fetchval`` (the relay's next-due query) raises
    what asyncpg raises for a connection closed under it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.failed = False

    @contextlib.asynccontextmanager
    async def _acquire(self, timeout: float | None) -> AsyncIterator[Any]:
        async with self._pool.acquire(timeout=timeout) as conn:
            yield _FailingFetchval(conn, self)

    def acquire(self, timeout: float | None = None) -> Any:
        return self._acquire(timeout)


class _FailingFetchval:
    def __init__(self, conn: Any, owner: _ClosedOnFetchval) -> None:
        self._conn = conn
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchval(self, *args: Any) -> Any:
        if not self._owner.failed:
            self._owner.failed = True
            raise asyncpg.InterfaceError("cannot call Connection.fetchval(): connection is closed")
        return await self._conn.fetchval(*args)


async def _true(value: bool) -> bool:
    return value


class _OneConnection:
    """A pool stand-in handing out one connection, so that ApiRepository.insert runs inside
    a transaction the test controls (its own transaction becomes a savepoint)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        yield self._conn

    def acquire(self, timeout: float | None = None) -> Any:
        return self._acquire()


async def test_publishes_committed_rows_and_nothing_rolled_back(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Rows of a committed insert are published once; rows of an open, then rolled-back,
    transaction never are."""
    relay = make_relay(pool, broker.publisher(), sink, deployment)
    committed = await insert(pool, tenant, 3)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        uncommitted = uuid7()
        rows = await ApiRepository(_OneConnection(conn), timeout=10).insert(  # type: ignore[arg-type]
            tenant.id, [NewTask(id=uncommitted, request=TaskRequest(type="relay.test"))]
        )
        assert len(rows) == 1
        # While the insert is not committed the relay cannot see it (nor block on it).
        await asyncio.wait_for(flush_until_empty(relay), 10)
        await tx.rollback()
    await flush_until_empty(relay)
    published = [m for m in await broker.drain() if m.task_id in {*committed, uncommitted}]
    assert sorted(m.task_id for m in published) == sorted(committed)
    assert all(m.attempt == 1 and m.tenant_id == tenant.id for m in published)
    assert await outbox_rows(pool, [*committed, uncommitted]) == []
    assert await pool.fetchval("SELECT count(*) FROM tasks WHERE id = $1", uncommitted) == 0


class _CheckingPublisher(Publisher):
    """Asserts, at publish time, that the rows being published are still in the outbox."""

    def __init__(self, inner: Publisher, pool: asyncpg.Pool) -> None:
        self._inner = inner
        self._pool = pool
        self.seen_in_outbox: list[bool] = []

    async def publish(self, batch: Sequence[Outgoing]) -> Published:
        for item in batch:
            task_id = UUID(item.message_id.split(":")[0])
            # Read from another connection: the relay's own transaction holds the row
            # locked but not deleted, and other sessions still see it.
            count = await self._pool.fetchval(
                "SELECT count(*) FROM outbox WHERE task_id = $1", task_id
            )
            self.seen_in_outbox.append(count == 1)
        return await self._inner.publish(batch)


class _RefusingPublisher(Publisher):
    """Confirms nothing: every message timed out, or (``refuse``) was nacked."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls = 0
        self._refuse = refuse

    async def publish(self, batch: Sequence[Outgoing]) -> Published:
        self.calls += 1
        n = len(batch)
        return Published(
            [False] * n,
            refused=n if self._refuse else 0,
            failed=0 if self._refuse else n,
            error="test",
        )


class _HalfPublisher(Publisher):
    """Confirms every other message of a batch through the real broker."""

    def __init__(self, inner: Publisher) -> None:
        self._inner = inner

    async def publish(self, batch: Sequence[Outgoing]) -> Published:
        result = await self._inner.publish(batch[::2])
        confirmed = [i % 2 == 0 and result.confirmed[i // 2] for i in range(len(batch))]
        return Published(confirmed, failed=confirmed.count(False), error="test")


async def test_rows_are_deleted_only_after_publishing(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """A row is still in the outbox while it is published, and stays there when the
    broker does not confirm; it is gone once a publish is confirmed."""
    ids = await insert(pool, tenant, 2)
    refusing = _RefusingPublisher()
    with pytest.raises(DependencyError):
        await make_relay(pool, refusing, sink, deployment).flush_once()
    assert refusing.calls == 1
    assert len(await outbox_rows(pool, ids)) == 2
    assert [m for m in await broker.drain() if m.task_id in ids] == []

    checking = _CheckingPublisher(broker.publisher(), pool)
    await flush_until_empty(make_relay(pool, checking, sink, deployment))
    assert checking.seen_in_outbox and all(checking.seen_in_outbox)
    assert await outbox_rows(pool, ids) == []
    assert sorted(m.task_id for m in await broker.drain() if m.task_id in ids) == sorted(ids)


async def test_confirmed_rows_of_a_partly_confirmed_batch_are_deleted(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Rows the broker confirmed leave the outbox even when others of their batch were
    not (no needless republish); a slow broker does not make the API refuse tasks, a
    refusing one (nacks) does."""
    ids = await insert(pool, tenant, 6)
    relay = make_relay(pool, _HalfPublisher(broker.publisher()), sink, deployment)
    with pytest.raises(DependencyError):
        await relay.flush_once()
    assert len(await outbox_rows(pool, ids)) == 3
    assert len([m for m in await broker.drain() if m.task_id in ids]) == 3
    assert not relay.refusing
    refusing = make_relay(pool, _RefusingPublisher(refuse=True), sink, deployment)
    with pytest.raises(DependencyError):
        await refusing.flush_once()
    assert refusing.refusing
    await flush_until_empty(make_relay(pool, broker.publisher(), sink, deployment))
    assert await outbox_rows(pool, ids) == []


async def test_two_relays_publish_each_row_once(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Two relays running at once on the same rows (SKIP LOCKED) publish each row once."""
    ids = await insert(pool, tenant, 120)
    counts: dict[int, int] = {0: 0, 1: 0}

    class Counting(Publisher):
        def __init__(self, inner: Publisher, index: int) -> None:
            self._inner = inner
            self._index = index

        async def publish(self, batch: Sequence[Outgoing]) -> Published:
            await asyncio.sleep(0.01)  # widen the window in which both hold a batch
            result = await self._inner.publish(batch)
            counts[self._index] += len(batch)
            return result

    relays = [
        make_relay(pool, Counting(broker.publisher(), i), sink, deployment, batch_size=10)
        for i in range(2)
    ]
    await asyncio.wait_for(asyncio.gather(*(flush_until_empty(r) for r in relays)), 30)
    published = [m.task_id for m in await broker.drain() if m.task_id in set(ids)]
    assert sorted(published) == sorted(ids)  # every row, none twice
    assert await outbox_rows(pool, ids) == []
    assert counts[0] > 0 and counts[1] > 0  # both relays did work, side by side


async def test_two_running_relays_share_the_work(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Two relay loops woken by NOTIFY publish every new row exactly once."""
    stop = asyncio.Event()
    relays = [
        make_relay(pool, broker.publisher(), sink, deployment, batch_size=7, poll_s=0.5)
        for _ in range(2)
    ]
    loops = [asyncio.create_task(r.run(stop), name=f"relay-{i}") for i, r in enumerate(relays)]
    try:
        ids: list[UUID] = []
        for _ in range(5):
            ids += await insert(pool, tenant, 10)
        got: list[UUID] = []

        async def all_published() -> bool:
            got.extend(m.task_id for m in await broker.drain() if m.task_id in set(ids))
            return len(got) >= len(ids)

        await eventually(all_published, within=20, what="every row published")
        await asyncio.sleep(0.3)  # a duplicate, if any, would arrive now
        got.extend(m.task_id for m in await broker.drain() if m.task_id in set(ids))
        assert sorted(got) == sorted(ids)
        assert not any(r.refusing for r in relays)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), 15)


async def test_a_row_is_not_published_before_it_is_due(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """A delayed task's row waits in the outbox until available_at, then is published."""
    relay = make_relay(pool, broker.publisher(), sink, deployment, poll_s=0.2)
    started = time.monotonic()
    (delayed,) = await insert(pool, tenant, delay_s=1.5)
    (now,) = await insert(pool, tenant)
    await flush_until_empty(relay)
    first = {m.task_id for m in await broker.drain()}
    assert now in first and delayed not in first
    assert len(await outbox_rows(pool, [delayed])) == 1

    async with relay_running(relay):
        await wait_published(broker, delayed, within=15, what="the delayed row")
        elapsed = time.monotonic() - started
    assert elapsed >= 1.5 - 0.05, elapsed  # not early (clock granularity aside)
    assert elapsed < 6, elapsed  # and the relay woke for it, not much later
    assert await outbox_rows(pool, [delayed]) == []


async def test_an_idle_relay_waits_while_another_holds_the_due_rows(
    isolated: Isolated, broker: Broker, sink: EventSink
) -> None:
    """While another relay's flush holds the only due row, a relay with nothing to do
    sleeps until its poll instead of flushing again at once; once that row is free (its
    holder gone without publishing), the poll publishes it."""
    pool, deployment = isolated.db, isolated.deployment
    (task_id,) = await insert(pool, isolated.tenant)
    holder = await asyncpg.connect(deployment.database_url)
    holding = holder.transaction()
    await holding.start()
    await holder.fetch("SELECT id FROM outbox WHERE task_id = $1 FOR UPDATE", task_id)
    relay = make_relay(pool, broker.publisher(), sink, deployment, poll_s=1.0)
    flushes = 0
    flush = relay.flush_once

    async def counted_flush() -> int:
        nonlocal flushes
        flushes += 1
        return await flush()

    relay.flush_once = counted_flush  # type: ignore[method-assign]
    try:
        async with relay_running(relay):
            await asyncio.sleep(0.6)
            assert flushes <= 2, f"{flushes} flushes in 0.6 s with nothing it could take"
            await holding.rollback()  # the holder died before publishing
            await wait_published(broker, task_id, within=10, what="the released row")
    finally:
        await holder.close()
    assert await outbox_rows(pool, [task_id]) == []


async def test_a_client_side_connection_error_is_retried_not_fatal(
    isolated: Isolated, broker: Broker, sink: EventSink
) -> None:
    """asyncpg raises InterfaceError, not a PostgresError, for a connection closed under
    it: the relay backs off and flushes again instead of ending, whether a flush or the
    idle relay's next-due query met it."""
    pool, deployment = isolated.db, isolated.deployment
    closing = _ClosedOnFetchval(pool)
    relay = make_relay(closing, broker.publisher(), sink, deployment, poll_s=0.2)  # type: ignore[arg-type]
    failures = 0
    flush = relay.flush_once

    async def failing_once() -> int:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed")
        return await flush()

    relay.flush_once = failing_once  # type: ignore[method-assign]
    (task_id,) = await insert(pool, isolated.tenant)
    async with relay_running(relay) as loop:
        await wait_published(broker, task_id, within=10, what="the task after the error")
        await eventually(
            lambda: _true(closing.failed), within=10, interval=0.02, what="the next-due query"
        )
        (later,) = await insert(pool, isolated.tenant)  # found by the poll, not woken for
        await wait_published(broker, later, within=10, what="a task after the next-due error")
        assert not loop.done()
    assert failures == 1


async def insert_claimed(
    pool: asyncpg.Pool,
    tenant: Tenant,
    n: int,
    claim_s: float,
    owner: int | None = None,
    **request: Any,
) -> tuple[list[UUID], list[Handed]]:
    """Insert as an API with a relay does: the rows due now are claimed for ``claim_s``
    (by ``owner``) and handed over (here: collected and returned, as if their process
    died)."""
    handed: list[Handed] = []
    repo = ApiRepository(
        pool,
        timeout=10,
        hand_over=handed.extend,
        claim_s=claim_s,
        owner=None if owner is None else lambda: owner,
    )
    tasks = [
        NewTask(id=uuid7(), request=TaskRequest(type="relay.test", **request)) for _ in range(n)
    ]
    assert len(await repo.insert(tenant.id, tasks)) == n
    return [t.id for t in tasks], handed


async def all_released(pool: asyncpg.Pool, ids: Sequence[UUID]) -> bool:
    """Whether every outbox row of these tasks is unclaimed: released, for a lapsed
    claim keeps its time."""
    count = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[]) AND claimed_until IS NULL",
        list(ids),
    )
    return bool(count == len(ids))


async def test_handed_over_rows_are_published_by_their_process_alone(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Fresh tasks go from the insert to its process's relay with their bodies: that relay
    publishes and deletes them without reading the outbox, while another relay's flush
    leaves them alone. A delayed task is not handed over, nor claimed."""
    ids, handed = await insert_claimed(pool, tenant, 5, claim_s=60)
    (delayed,), none = await insert_claimed(pool, tenant, 1, claim_s=60, delay_s=30)
    assert sorted(h.task_id for h in handed) == sorted(ids) and none == []
    assert all(parse_task_message(h.body).task_id == h.task_id for h in handed)
    await flush_until_empty(make_relay(pool, broker.publisher(), sink, deployment))
    assert [m for m in await broker.drain() if m.task_id in {*ids, delayed}] == []
    assert len(await outbox_rows(pool, ids)) == 5
    assert (
        await pool.fetchval("SELECT claimed_until FROM outbox WHERE task_id = $1", delayed) is None
    )

    owner = make_relay(pool, broker.publisher(), sink, deployment)
    async with relay_running(owner):
        owner.hand_over(handed)
        await outbox_emptied(pool, ids)
    published = [m for m in await broker.drain() if m.task_id in set(ids)]
    assert sorted(m.task_id for m in published) == sorted(ids)
    assert all(m.attempt == 1 for m in published)
    assert len(await outbox_rows(pool, [delayed])) == 1


async def test_a_claim_lapses_and_any_relay_publishes_the_row(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """The process that claimed a row died before publishing it: once the claim lapses,
    another relay's poll publishes it."""
    ids, _lost_with_its_process = await insert_claimed(pool, tenant, 3, claim_s=3)
    relay = make_relay(pool, broker.publisher(), sink, deployment, poll_s=0.2)
    await flush_until_empty(relay)
    assert [m for m in await broker.drain() if m.task_id in set(ids)] == []
    got: list[UUID] = []
    async with relay_running(relay):

        async def all_published() -> bool:
            got.extend(m.task_id for m in await broker.drain() if m.task_id in set(ids))
            return len(got) >= len(ids)

        await eventually(all_published, within=10, interval=0.05, what="the lapsed rows")
    assert sorted(got) == sorted(ids)
    assert await outbox_rows(pool, ids) == []


async def _owner_locked(pool: asyncpg.Pool, owner: int) -> bool:
    held = await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 2"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        OWNER_LOCK_CLASS,
        owner,
    )
    return bool(held)


async def test_rows_of_a_process_that_died_are_released_before_their_claim_lapses(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Rows claimed by a process whose owner lock is held stay claimed however old; once
    its connection is gone (the process died), any relay releases them at once, though
    their claim would hold for ten more minutes, and publishes them."""
    alive = make_relay(pool, broker.publisher(), sink, deployment)
    assert alive.owner_key() is None  # no lock yet: rows it claimed would carry no key
    async with relay_running(alive):
        await eventually(
            lambda: _owner_locked(pool, alive.owner), within=10, what="the relay's owner lock"
        )
        assert alive.owner_key() == alive.owner
        # A process of its own, holding its owner lock as a relay's LISTEN connection does.
        claimer = await asyncpg.connect(deployment.database_url)
        try:
            owner = alive.owner + 1 if alive.owner < 2**31 - 1 else 1
            assert await claimer.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", OWNER_LOCK_CLASS, owner
            )
            ids, _handed = await insert_claimed(pool, tenant, 3, claim_s=600, owner=owner)
            await asyncio.sleep(ORPHAN_AFTER_S + 0.3)  # older than a live claimer's rows
            await alive.release_orphans()  # as the running relay's loop does too
            claimed = await pool.fetchval(
                "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])"
                " AND claimed_until IS NOT NULL",
                ids,
            )
            assert claimed == len(ids), "rows of a live claimer were released"
        finally:
            await claimer.close()  # the claimer dies
        got: list[UUID] = []

        async def all_published() -> bool:
            got.extend(m.task_id for m in await broker.drain() if m.task_id in set(ids))
            return len(got) >= len(ids)

        await eventually(all_published, within=15, interval=0.05, what="the orphaned rows")
    assert sorted(got) == sorted(ids)
    assert await outbox_rows(pool, ids) == []
    # Stopped: its lock is released with its LISTEN connection, after its last rows.
    assert alive.owner_key() is None and not await _owner_locked(pool, alive.owner)


async def test_rows_claimed_with_no_key_wait_for_their_claim(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Rows inserted while their process held no owner lock carry no key: no relay takes
    them for a dead process's, however old, until their claim lapses."""
    ids, _handed = await insert_claimed(pool, tenant, 2, claim_s=600)
    relay = make_relay(pool, broker.publisher(), sink, deployment)
    await asyncio.sleep(ORPHAN_AFTER_S + 0.3)
    assert await relay.release_orphans() == 0
    await flush_until_empty(relay)
    assert [m for m in await broker.drain() if m.task_id in set(ids)] == []
    assert len(await outbox_rows(pool, ids)) == 2
    await pool.execute("DELETE FROM outbox WHERE task_id = ANY($1::uuid[])", ids)


async def test_handed_rows_the_broker_did_not_confirm_are_released(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Handed-over rows the broker refused are released at once (not left claimed until
    the claim lapses), so every relay's poll retries them; a refusal stops admissions."""
    ids, handed = await insert_claimed(pool, tenant, 4, claim_s=600)
    refusing = make_relay(pool, _RefusingPublisher(refuse=True), sink, deployment, poll_s=30)

    async with relay_running(refusing):
        refusing.hand_over(handed)
        await eventually(
            lambda: all_released(pool, ids), interval=0.02, what="the refused rows released"
        )
        assert refusing.refusing
    await flush_until_empty(make_relay(pool, broker.publisher(), sink, deployment))
    assert sorted(m.task_id for m in await broker.drain() if m.task_id in set(ids)) == sorted(ids)
    assert await outbox_rows(pool, ids) == []


async def test_handed_over_rows_are_published_before_the_relay_stops(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Shutdown drains: what was handed over before ``stop`` is published and deleted
    then, not left to other relays once the claims lapse."""
    ids, handed = await insert_claimed(pool, tenant, 7, claim_s=600)
    owner = make_relay(pool, broker.publisher(), sink, deployment, batch_size=3)
    async with relay_running(owner):
        owner.hand_over(handed)
    assert sorted(m.task_id for m in await broker.drain() if m.task_id in set(ids)) == sorted(ids)
    assert await outbox_rows(pool, ids) == []


async def test_a_retry_row_is_not_deleted_with_the_published_first_attempt(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """A task cancelled before it ran and retried gets a new first-attempt row while the
    published one awaits its deletion: only the published row goes (by row id), or
    nothing would ever publish the retry."""
    (task_id,), handed = await insert_claimed(pool, tenant, 1, claim_s=600)
    async with pool.acquire() as conn, conn.transaction():
        # What the cancel and the retry do to the outbox; the retry's row is due later
        # here so that no relay's poll publishes (and deletes) it during the test.
        await conn.execute("DELETE FROM outbox WHERE task_id = $1", task_id)
        retry_row = await conn.fetchval(
            "INSERT INTO outbox (task_id, attempt, body, available_at)"
            " VALUES ($1, 1, $2, now() + interval '1 hour') RETURNING id",
            task_id,
            handed[0].body,
        )
    owner = make_relay(pool, broker.publisher(), sink, deployment)
    async with relay_running(owner):
        owner.hand_over(handed)
        await wait_published(broker, task_id, within=10, what="the first attempt")
    assert [
        r["id"] for r in await pool.fetch("SELECT id FROM outbox WHERE task_id = $1", task_id)
    ] == [retry_row]


async def test_rows_whose_claim_lapses_before_their_publish_are_released(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Rows handed over too late to be published and deleted within their claim (queued
    behind a slow broker) are released at once (``claimed_until`` NULL, where a lapsed
    claim keeps its time) for every relay's poll; then published once."""
    ids, handed = await insert_claimed(pool, tenant, 3, claim_s=2)
    # Its timeout is 10 s, so a 2 s claim is too short; its broker confirms nothing, so
    # the rows stay in the outbox to be looked at.
    owner = make_relay(pool, _RefusingPublisher(), sink, deployment, poll_s=60)

    async with relay_running(owner):
        owner.hand_over(handed)
        await eventually(
            lambda: all_released(pool, ids), interval=0.02, what="the late rows released"
        )
    await flush_until_empty(make_relay(pool, broker.publisher(), sink, deployment))
    assert sorted(m.task_id for m in await broker.drain() if m.task_id in set(ids)) == sorted(ids)
    assert await outbox_rows(pool, ids) == []


async def test_retrying_task_is_promoted_to_queued_when_published(
    pool: asyncpg.Pool,
    deployment: Deployment,
    tenant: Tenant,
    broker: Broker,
    sink: EventSink,
    redis: Redis,
) -> None:
    """When the next attempt of a retrying task is published, the task becomes queued,
    its last_seq grows by one and the matching event is written to its stream."""
    relay = make_relay(pool, broker.publisher(), sink, deployment)
    (task_id,) = await insert(pool, tenant)
    await flush_until_empty(relay)
    (message,) = [m for m in await broker.drain() if m.task_id == task_id]

    # What a worker does: claim attempt 1, fail it retryably, schedule attempt 2.
    worker = WorkerRepository(pool, timeout=10)
    claimed = await worker.claim(message, "test-worker", lease_s=30)
    assert claimed is not None
    error = {"type": "flaky", "message": "try again", "retryable": True}
    retrying = await worker.retry_later(message, error, delay_s=0)
    assert retrying is not None and retrying["state"] == "retrying"
    seq_retrying = retrying["last_seq"]

    await flush_until_empty(relay)
    (second,) = [m for m in await broker.drain() if m.task_id == task_id]
    assert second.attempt == 2
    row = await pool.fetchrow(
        "SELECT state, attempts, last_seq, next_attempt_at FROM tasks WHERE id = $1", task_id
    )
    assert row["state"] == "queued"
    assert row["last_seq"] == seq_retrying + 1
    assert row["attempts"] == 1 and row["next_attempt_at"] is None
    entries = await redis.xrange(broker.wire.event_stream(task_id))
    assert entries, "no event written for the promotion"
    entry_id, fields = entries[-1]
    event = parse_event(fields[b"e"])
    assert entry_id == f"{seq_retrying + 1}-0".encode()
    assert (event.seq, event.state, event.task_id) == (seq_retrying + 1, "queued", task_id)

    # A stale copy of the same row (published again after a crash) promotes nothing.
    await pool.execute(
        "INSERT INTO outbox (task_id, attempt, body) VALUES ($1, 2, $2)",
        task_id,
        second.model_dump_json().encode(),
    )
    await flush_until_empty(relay)
    assert await pool.fetchval("SELECT last_seq FROM tasks WHERE id = $1", task_id) == (
        seq_retrying + 1
    )
    await broker.drain()


async def test_published_message_is_persistent_and_identified(
    pool: asyncpg.Pool, deployment: Deployment, tenant: Tenant, broker: Broker, sink: EventSink
) -> None:
    """Messages are persistent JSON with message_id task_id:attempt (for tracing dedup)."""
    (task_id,) = await insert(pool, tenant)
    await flush_until_empty(make_relay(pool, broker.publisher(), sink, deployment))
    found = None
    while (message := await broker.topology.queue.get(no_ack=True, fail=False)) is not None:
        if parse_task_message(message.body).task_id == task_id:
            found = message
    assert found is not None
    assert found.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert found.message_id == f"{task_id}:1"
    assert found.content_type == "application/json"


@contextlib.asynccontextmanager
async def private_route(
    broker: Broker, suffix: str, arguments: dict[str, Any] | None = None
) -> AsyncIterator[tuple[str, aio_pika.abc.AbstractQueue]]:
    """An exchange and a classic queue bound by the same name, removed afterwards."""
    name = f"{broker.wire.namespace}_{suffix}"
    exchange = await broker.channel.declare_exchange(name, auto_delete=True)
    queue = await broker.channel.declare_queue(name, auto_delete=True, arguments=arguments)
    await queue.bind(exchange, routing_key=name)
    try:
        yield name, queue
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()


async def test_the_publisher_counts_what_the_broker_refuses(broker: Broker) -> None:
    """Nacks (a queue at x-max-length refusing publishes) and returns (no route) are
    refusals, each of its own message, not failures of the batch."""
    # A classic queue: a quorum queue enforces its length a little late, this one exactly.
    limited = {"x-max-length": 2, "x-overflow": "reject-publish"}
    async with private_route(broker, "full", limited) as (name, _):
        batch = [Outgoing(message_id=f"m{i}", body=b"{}") for i in range(5)]
        full = await Publisher(broker.channel, name, name, 10).publish(batch)
        assert (full.confirmed, full.refused, full.failed) == ([True] * 2 + [False] * 3, 3, 0)
        nowhere = await Publisher(broker.channel, name, "no-such-route", 10).publish(batch[:1])
        assert (nowhere.confirmed, nowhere.refused, nowhere.failed) == ([False], 1, 0)
        # A returned message is forgotten once settled: nothing of it is left behind.
        underlay = await broker.channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        assert not underlay.message_id_delivery_tag


async def test_a_batch_arrives_whole_in_order_and_bodies_larger_than_a_frame_too(
    broker: Broker,
) -> None:
    """The batch is written as one frame sequence: each message keeps its properties,
    the batch its order, and a body longer than the connection's frame is split over
    several body frames and arrives whole."""
    underlay = await broker.channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    large = bytes(range(256)) * (underlay.max_content_size * 5 // 2 // 256)
    batch = [
        Outgoing(message_id="small-1", body=b'{"n": 1}', trace_id="trace-1"),
        Outgoing(message_id="large", body=large),
        Outgoing(message_id="small-2", body=b'{"n": 2}'),
    ]
    async with private_route(broker, "whole") as (name, queue):
        result = await Publisher(broker.channel, name, name, 10).publish(batch)
        assert result == Published([True, True, True])
        got = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(message)
    assert [(m.message_id, m.body) for m in got] == [(o.message_id, o.body) for o in batch]
    assert [m.correlation_id for m in got] == ["trace-1", None, None]
    assert {(m.delivery_mode, m.content_type) for m in got} == {
        (aio_pika.DeliveryMode.PERSISTENT, "application/json")
    }


async def test_batches_that_time_out_leave_the_channel_confirming_the_right_messages(
    broker: Broker,
) -> None:
    """A batch that could not be queued in time (the channel's lock held meanwhile) fails
    whole and sends nothing. One that was queued but not confirmed in time fails too, yet
    still reaches the broker, and its delivery tags stay taken: the next batch's confirms
    and nacks land on the right messages."""
    underlay = await broker.channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    limited = {"x-max-length": 2, "x-overflow": "reject-publish"}
    async with private_route(broker, "timeout", limited) as (name, queue):
        never = [Outgoing(message_id=f"never{i}", body=b"{}") for i in range(2)]
        async with underlay.lock:
            late = await Publisher(broker.channel, name, name, 0.05).publish(never)
        assert late == Published([False, False], failed=2, error="no confirm in time")
        # Queued at once, unconfirmed a microsecond later (a confirm that did come in
        # time would do as well): either way the broker takes it, the first of two.
        hurried = [Outgoing(message_id="hurried", body=b"{}")]
        await Publisher(broker.channel, name, name, 1e-6).publish(hurried)
        batch = [Outgoing(message_id=f"next{i}", body=b"{}") for i in range(3)]
        result = await Publisher(broker.channel, name, name, 10).publish(batch)
        assert (result.confirmed, result.refused, result.failed) == ([True, False, False], 2, 0)
        got = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(message.message_id)
        assert got == ["hurried", "next0"]
        assert not set(underlay.message_id_delivery_tag) & {"hurried", "next0", "next1"}


async def test_a_closed_channel_fails_the_batch_without_raising(broker: Broker) -> None:
    channel = await broker.connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.close()
    batch = [Outgoing(message_id=f"c{i}", body=b"{}") for i in range(2)]
    result = await Publisher(channel, broker.wire.tasks_exchange, "any", 10).publish(batch)
    assert (result.confirmed, result.refused, result.failed) == ([False, False], 0, 2)
    assert result.error is not None and "closed" in result.error


async def test_a_connection_closing_while_a_batch_waits_for_its_write_fails_the_batch(
    broker: Broker, deployment: Deployment
) -> None:
    """The batch is queued but not yet written when the connection closes: aiormq rejects
    the write with the close's reason, CancelledError for a close of our own. That must
    fail the batch, not cancel the relay loop that called publish()."""
    connection = await amqp.connect(deployment.amqp_url, "longhaul-test-close", timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        # Hold the writer back: the batch goes to a queue no writer reads.
        real_queue, underlay.write_queue = underlay.write_queue, asyncio.Queue()
        batch = [Outgoing(message_id=f"w{i}", body=b"{}") for i in range(2)]
        publisher = Publisher(channel, broker.wire.tasks_exchange, "any", 10)
        publishing = asyncio.create_task(publisher.publish(batch))

        async def queued() -> bool:
            return len(underlay.confirmations) == 2

        await eventually(queued, within=5, what="the batch queued")
        assert not publishing.done()  # waiting for its write
        underlay.write_queue = real_queue  # the close itself must reach the broker
        await connection.close()
        result = await asyncio.wait_for(publishing, 5)  # returns, does not raise
        assert (result.confirmed, result.failed) == ([False, False], 2)
        assert result.error is not None and "Cancelled" in result.error
        assert not underlay.message_id_delivery_tag
    finally:
        await connection.close()
