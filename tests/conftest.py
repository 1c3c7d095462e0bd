"""Session fixtures: a private database, namespace (queues, Redis keys) and ports per run.

Tests that claim delivery, persistence or progress use the real RabbitMQ, Redis and
PostgreSQL. If one of them is unreachable the session fails with one line: it never
skips, so a CI run without services cannot pass by testing nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from uuid import UUID

import aio_pika
import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from shared import keys
from shared.db import create_pool, migrate
from shared.decommission import delete_amqp, drop_database, unlink_keys
from shared.ids import uuid7
from shared.wire import Wire
from tests.faults.private import PrivateRedis
from tests.support import free_port, new_run_id

# The fault table's hooks must run on an xdist controller too, which loads only this conftest.
pytest_plugins = ("tests.faults.report",)

AMQP_URL = os.environ.get("LONGHAUL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("LONGHAUL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# The environment the test session started with, for commands the tests run.
ROOT_ENV = dict(os.environ)
PG_ADMIN_URL = os.environ.get(
    "LONGHAUL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@dataclass(frozen=True)
class Deployment:
    """Everything a test needs to start services or talk to the run's private names."""

    run_id: str
    namespace: str
    database_url: str
    amqp_url: str
    redis_url: str

    @property
    def wire(self) -> Wire:
        return Wire(self.namespace)

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "LONGHAUL_NAMESPACE": self.namespace,
            "LONGHAUL_DATABASE_URL": self.database_url,
            "LONGHAUL_AMQP_URL": self.amqp_url,
            "LONGHAUL_REDIS_URL": self.redis_url,
            "LONGHAUL_START_TIMEOUT_S": "20",
            # A check's answer within 2 s, not 0.5: two test processes share the machine,
            # and a slow ping read as a dependency down would fail a test for nothing.
            "LONGHAUL_READY_TIMEOUT_S": "2",
            "LONGHAUL_LOG_FORMAT": "json",
            "LONGHAUL_LOG_LEVEL": "INFO",
        }
        base.update({f"LONGHAUL_{k.upper()}": v for k, v in extra.items()})
        return base


def _pg_url(database: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database


@contextlib.asynccontextmanager
async def scratch_database(name: str, *, create: bool) -> AsyncIterator[str]:
    """The URL of database ``name``, created empty (``create``) or left for the code
    under test to create; dropped before and after, even when the test fails."""
    await drop_database(PG_ADMIN_URL, name, force=True, timeout=30)
    try:
        if create:
            admin = await asyncpg.connect(PG_ADMIN_URL)
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
        yield _pg_url(name)
    finally:
        await drop_database(PG_ADMIN_URL, name, force=True, timeout=30)


@pytest.fixture(scope="session")
async def deployment() -> AsyncIterator[Deployment]:
    run_id = new_run_id()
    namespace = f"lhtest_{run_id}"
    database_url = _pg_url(namespace)
    try:
        await migrate(database_url, timeout=10)
        redis = Redis.from_url(REDIS_URL)
        await redis.ping()
        conn = await aio_pika.connect(AMQP_URL, timeout=10)
        await conn.close()
    except (OSError, asyncpg.PostgresError, TimeoutError, Exception) as exc:
        pytest.exit(
            f"a test dependency is unreachable (run `make services`): {exc!r}", returncode=3
        )
    dep = Deployment(run_id, namespace, database_url, AMQP_URL, REDIS_URL)
    try:
        yield dep
    finally:
        await _cleanup(dep, redis)


async def _cleanup(dep: Deployment, redis: Redis) -> None:
    """Drop the run's database, queues, exchanges and Redis keys."""
    await drop_database(PG_ADMIN_URL, dep.namespace, force=True, timeout=30)
    await drop_namespace(dep, redis)
    await redis.aclose()


async def drop_namespace(dep: Deployment, redis: Redis) -> None:
    """Delete a namespace's queues, exchanges and Redis keys, as ``longhaul namespace
    delete`` does."""
    await unlink_keys(redis, dep.wire.redis_prefix)
    await delete_amqp(dep.amqp_url, dep.wire.queues, dep.wire.exchanges, timeout=10, force=True)


@pytest.fixture
async def fresh_namespace(deployment: Deployment) -> AsyncIterator[Deployment]:
    """The run's database under a namespace of its own: new queues (with arguments of
    the test's choosing) and Redis keys, deleted afterwards."""
    dep = replace(deployment, namespace=f"{deployment.namespace}_{new_run_id()}")
    try:
        yield dep
    finally:
        redis = Redis.from_url(dep.redis_url)
        try:
            await drop_namespace(dep, redis)
        finally:
            await redis.aclose()


@dataclass(frozen=True)
class Isolated:
    """A namespace with a database of its own, its pool and a tenant in it."""

    deployment: Deployment
    db: asyncpg.Pool
    tenant: Tenant


@pytest.fixture
async def isolated(deployment: Deployment) -> AsyncIterator[Isolated]:
    """For tests that count what reaches their queue. In the run's shared database any
    relay publishes any due outbox row, and any reaper requeues any expired lease, into
    its own namespace's queue: rows and tasks other tests left behind would arrive."""
    namespace = f"{deployment.namespace}_{new_run_id()}"
    dep = replace(deployment, namespace=namespace, database_url=_pg_url(namespace))
    await migrate(dep.database_url, timeout=30)
    pool = await create_pool(dep.database_url, max_size=4, timeout=30)
    try:
        yield Isolated(dep, pool, await create_tenant(pool))
    finally:
        await pool.close()
        await _cleanup(dep, Redis.from_url(dep.redis_url))  # the database is the namespace's


@pytest.fixture(scope="session")
async def db(deployment: Deployment) -> AsyncIterator[asyncpg.Pool]:
    # The services' own pool factory: JSON columns come back decoded.
    pool = await create_pool(deployment.database_url, max_size=4, timeout=30)
    yield pool
    await pool.close()


@dataclass(frozen=True)
class Tenant:
    id: UUID
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def key_id(self) -> str:
        parsed = keys.parse(self.key)
        assert parsed is not None
        return parsed.key_id


async def create_tenant(pool: asyncpg.Pool, name: str | None = None) -> Tenant:
    name = name or f"tenant-{uuid7().hex[-8:]}"
    tenant_id = uuid7()
    await pool.execute("INSERT INTO tenants (id, name) VALUES ($1, $2)", tenant_id, name)
    return Tenant(tenant_id, name, await add_key(pool, tenant_id))


async def add_key(pool: asyncpg.Pool, tenant_id: UUID) -> str:
    """A new API key of the tenant; the key itself."""
    new = keys.generate("test")
    await pool.execute(
        "INSERT INTO api_keys (key_id, tenant_id, label, secret_hash) VALUES ($1, $2, $3, $4)",
        new.key_id,
        tenant_id,
        new.label,
        new.secret_hash,
    )
    return new.key


@pytest.fixture(scope="session")
async def tenant(db: asyncpg.Pool) -> Tenant:
    return await create_tenant(db)


@pytest.fixture(scope="session")
async def other_tenant(db: asyncpg.Pool) -> Tenant:
    return await create_tenant(db)


@pytest.fixture
def ports() -> Iterator[dict[str, str]]:
    yield {
        "api_port": str(free_port()),
        "gateway_port": str(free_port()),
        "worker_metrics_port": str(free_port()),
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Floods send a few hundred requests at once: more than aiohttp's default 100.
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


@pytest.fixture
async def redis(deployment: Deployment) -> AsyncIterator[Redis]:
    """A client of the run's Redis (keys under the run's namespace)."""
    client = Redis.from_url(deployment.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    """A redis-server of the test's own, for tests that stop, pause or restart it."""
    with PrivateRedis() as server:
        yield server
