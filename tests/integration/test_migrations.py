"""The migration runner against a real PostgreSQL: idempotent, and safe when several
processes migrate a fresh database at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.db import migrate, migrations
from tests.conftest import PG_ADMIN_URL, Deployment, scratch_database


@pytest.fixture
async def fresh_database(deployment: Deployment) -> AsyncIterator[str]:
    """A database name of this run that does not exist yet; dropped afterwards."""
    async with scratch_database(f"{deployment.namespace}_mig", create=False) as url:
        yield url


async def _check_concurrent(dsn: str) -> None:
    results = await asyncio.gather(*(migrate(dsn, timeout=30) for _ in range(4)))
    versions = [m.version for m in migrations()]
    applied = sorted(v for result in results for v in result)
    assert applied == versions
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert [r["version"] for r in rows] == versions
    assert {
        "tenants",
        "api_keys",
        "task_types",
        "tasks",
        "outbox",
        "dead_letters",
        "schedules",
    } <= tables


async def test_concurrent_migrations_of_an_empty_database(fresh_database: str) -> None:
    """Four migrators racing on an existing, empty database apply each migration once."""
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{fresh_database.rsplit("/", 1)[1]}"')
    finally:
        await admin.close()
    await _check_concurrent(fresh_database)


async def test_concurrent_migrations_of_a_missing_database(fresh_database: str) -> None:
    """Four migrators racing on a database that does not exist yet (a fresh machine where
    api and worker start together) create it once and apply each migration once."""
    await _check_concurrent(fresh_database)


async def test_migrate_is_idempotent(fresh_database: str) -> None:
    """Migrating an up-to-date database applies nothing and changes nothing."""
    first = await migrate(fresh_database, timeout=30)
    assert first == [m.version for m in migrations()]
    assert await migrate(fresh_database, timeout=30) == []
    assert await migrate(fresh_database, timeout=30) == []
    conn = await asyncpg.connect(fresh_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(first)
    finally:
        await conn.close()


async def test_an_interrupted_non_transactional_migration_runs_again(fresh_database: str) -> None:
    """Index builds run outside a transaction (CONCURRENTLY, so a large table keeps taking
    writes). A crash can leave one half done, its version unrecorded: the next migrate
    runs it again from the start and ends with every index built and valid."""
    await migrate(fresh_database, timeout=30)
    again = [m.version for m in migrations() if not m.transactional]
    assert again, "no migration builds its indexes concurrently"
    conn = await asyncpg.connect(fresh_database)
    try:
        # As if interrupted: versions unrecorded, one index left invalid.
        await conn.execute("DELETE FROM schema_migrations WHERE version = ANY($1)", again)
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'tasks_finished'::regclass"
        )
        assert await migrate(fresh_database, timeout=30) == again
        invalid = await conn.fetch(
            "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE NOT indisvalid"
        )
        names = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname='public'")
        }
    finally:
        await conn.close()
    assert invalid == []
    assert {"tasks_retrying", "tasks_lease_expiry", "outbox_by_task", "tasks_finished"} <= names
    assert "tasks_leases" not in names
