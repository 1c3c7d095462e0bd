"""PostgreSQL plumbing: the pool every service opens, and the migration runner.

We run our own small migrator rather than Alembic: the schema is plain SQL files,
nothing here uses an ORM, and the runner must be safe when several processes start at
once, which one advisory lock gives us."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from shared.errors import ConfigError, DependencyError

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "longhaul_outbox"
_MIGRATE_LOCK = 0x6C6F6E67  # "long": any constant, shared by every migrating process


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset on release (a round trip per query: RESET ALL, UNLISTEN *,
    ...). Nothing here changes session state on pooled connections: transactions are
    always closed by their context manager and LISTEN uses a connection of its own."""


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 5.0,
    generic_plans: bool = False,
) -> asyncpg.Pool:
    """A pool with JSON codecs and a statement timeout, so no query hangs a request.

    ``generic_plans``: for processes whose statements all reach tasks by key (the
    worker, the gateway). PostgreSQL otherwise keeps planning a statement anew on every
    call whenever the plan for the actual array of keys looks cheaper than the generic
    one, which it does for a batch of one or two: planning the claim then cost twice
    its execution (0.5 ms a call)."""
    settings = {"statement_timeout": str(int(timeout * 1000))}
    if generic_plans:
        settings["plan_cache_mode"] = "force_generic_plan"
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            timeout=timeout,
            # The server's statement_timeout fires first (QueryCanceledError, the
            # connection fine); ours is for a server that stopped answering at all.
            command_timeout=timeout + 1.0,
            server_settings=settings,
        )
    except asyncpg.InvalidCatalogNameError as exc:
        raise missing_database(exc) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise refused_login(dsn, exc) from None
    except ANY_PG_ERROR as exc:
        raise DependencyError(f"PostgreSQL: {exc}") from exc
    assert pool is not None
    return pool


async def connect(dsn: str, timeout: float) -> asyncpg.Connection:
    """One connection to a database this code may use (the CLI's): a database that is
    missing or not migrated is a ConfigError naming the fix."""
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except asyncpg.InvalidCatalogNameError as exc:
        raise missing_database(exc) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise refused_login(dsn, exc) from None
    try:
        await require_schema(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


def missing_database(exc: asyncpg.InvalidCatalogNameError) -> ConfigError:
    """A database that does not exist is no outage to wait out: the same fix as a schema
    that is behind (``longhaul migrate`` creates the database), told at once. No grace
    for one an orchestrator creates just after: fresh, it is unmigrated for a moment
    more, which stops a service at once too. Start services after the migration (the
    compose file does) and under a supervisor that restarts one that came too early."""
    return ConfigError(f"{exc}: run `longhaul migrate` first")


def refused_login(dsn: str, exc: asyncpg.InvalidAuthorizationSpecificationError) -> ConfigError:
    """A role, a password or a client address PostgreSQL refuses (pg_hba.conf) is no
    outage either: a start waited its whole timeout, then called it unreachable."""
    return ConfigError(
        f"PostgreSQL at {redacted(dsn)} refused the login ({exc}): check the user and"
        " password in LONGHAUL_DATABASE_URL"
    )


# First line of a migration that runs outside a transaction, one statement at a time:
# CREATE INDEX CONCURRENTLY on a large, busy table must not block its writes, and it
# cannot run in a transaction. Such a migration must be safe to run again from the
# start (DROP INDEX CONCURRENTLY IF EXISTS first): a crash may interrupt it anywhere.
NO_TRANSACTION = "-- longhaul:no-transaction"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The statements of a non-transactional migration: split at each ``;`` that
        ends a line (these files hold no semicolons elsewhere)."""
        parts = (part.strip() for part in self.sql.split(";\n"))
        return [p.removesuffix(";") for p in parts if _has_code(p)]


def _has_code(sql: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("--") for line in sql.splitlines())


def migrations() -> list[Migration]:
    """The shipped migrations, in order: files named ``NNNN_name.sql``."""
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            found.append(Migration(int(version), name, entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def require_schema(pool: asyncpg.Pool | asyncpg.Connection) -> None:
    """Refuse to serve a database whose schema is behind this code's migrations: one
    line that names the fix, not a traceback at the first query of a missing table."""
    latest = migrations()[-1].version
    with starting("schema version not read"):
        try:
            applied = await pool.fetchval("SELECT max(version) FROM schema_migrations")
        except asyncpg.UndefinedTableError:
            applied = None
    if applied is None or applied < latest:
        raise ConfigError(
            f"the database is not migrated (schema version {applied or 0}, this code needs"
            f" {latest}): run `longhaul migrate` first"
        )


@contextlib.contextmanager
def starting(failed: str) -> Iterator[None]:
    """Around a statement of a start, once connected: PostgreSQL failing it (a statement
    timeout behind a lock, a lost connection, a user without the grants) stops the start
    with one line, ``failed`` saying what was not done, not a traceback."""
    try:
        yield
    except asyncpg.InsufficientPrivilegeError as exc:
        # The user's grants are to fix: no wait mends them.
        raise ConfigError(
            f"PostgreSQL refused the user of LONGHAUL_DATABASE_URL: {failed}: {exc}"
        ) from None
    except ANY_PG_ERROR as exc:
        # asyncpg's own timeout (a server silent past command_timeout) says nothing.
        why = (
            "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        )
        raise DependencyError(f"PostgreSQL: {failed}: {why}") from None


def redacted(url: str) -> str:
    """The URL to show in a message: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def ensure_database(dsn: str, timeout: float) -> None:
    """Create the DSN's database if it does not exist (a fresh machine has none)."""
    database = urlsplit(dsn).path.lstrip("/") or "postgres"
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except asyncpg.InvalidCatalogNameError:
        pass
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise refused_login(dsn, exc) from None
    else:
        await conn.close()
        return
    admin = await asyncpg.connect(dsn, database="postgres", timeout=timeout)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Created meanwhile by another process (a race surfaces as either error).
        pass
    finally:
        await admin.close()


async def migrate(dsn: str, timeout: float = 30.0) -> list[int]:
    """Apply every migration not yet applied; return the versions applied now.

    Idempotent and safe to run from several processes at once: they queue on one
    advisory lock, and each migration commits with its version row (a non-transactional
    one records its version after its last statement, and runs again whole if
    interrupted)."""
    await ensure_database(dsn, timeout)
    conn = await asyncpg.connect(dsn, timeout=timeout)
    applied: list[int] = []
    try:
        await _lock(conn, timeout)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            if migration.transactional:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await _record(conn, migration)
            else:
                for statement in migration.statements():
                    await conn.execute(statement)
                await _record(conn, migration)
            log.info(
                "migration applied", extra={"version": migration.version, "name": migration.name}
            )
            applied.append(migration.version)
    finally:
        await conn.close()  # also releases the advisory lock
    return applied


async def _lock(conn: asyncpg.Connection, timeout: float) -> None:
    """Take the migration lock, polling: a migrator blocked inside pg_advisory_lock()
    holds a snapshot, which CREATE INDEX CONCURRENTLY in the lock holder would wait
    for (a deadlock); between two tries it holds nothing."""
    deadline = time.monotonic() + timeout
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MIGRATE_LOCK):
        if time.monotonic() > deadline:
            raise TimeoutError(f"another process held the migration lock for {timeout:g}s")
        await asyncio.sleep(0.05)


async def _record(conn: asyncpg.Connection, migration: Migration) -> None:
    await conn.execute(
        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
        migration.version,
        migration.name,
    )


# Errors that mean "PostgreSQL is unreachable, restarting or too slow", worth retrying; any other
# PostgresError is a bug or a constraint and is raised at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InternalClientError,
    # statement_timeout fired (a lock held, an overloaded server): slow, not wrong.
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
)
# Everything PostgreSQL may answer while it is away or restarting, or with any error:
# for callers that carry on without the answer. asyncpg's InterfaceError ("connection
# is closed") is not a PostgresError.
ANY_PG_ERROR: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *TRANSIENT_ERRORS)
