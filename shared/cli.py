"""Operator commands: migrate, keys, tenants, dlq, schedules, namespace."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import AsyncIterator, Sequence
from uuid import UUID

import asyncpg

from shared import deadletters, decommission, keys, schedules
from shared.db import ANY_PG_ERROR, connect, ensure_database, migrate, redacted
from shared.errors import ConfigError, DependencyError, Refused
from shared.events import EventSink
from shared.ids import uuid7
from shared.lifecycle import wait_for_dependency
from shared.redis import create_client
from shared.settings import CommonSettings, load
from shared.taskrows import EVENT_COLUMNS, Row, event_from_row
from shared.wire import Wire


@contextlib.asynccontextmanager
async def _database(settings: CommonSettings) -> AsyncIterator[asyncpg.Connection]:
    """One connection for one command, closed however the command ends."""
    conn = await connect(settings.database_url, settings.start_timeout_s)
    try:
        yield conn
    finally:
        await conn.close()


async def _migrate(settings: CommonSettings) -> None:
    # Run first in a deployment (compose's one-shot): PostgreSQL may still be starting.
    await wait_for_dependency(
        "PostgreSQL",
        lambda: ensure_database(settings.database_url, settings.io_timeout_s),
        settings.start_timeout_s,
    )
    applied = await migrate(settings.database_url, timeout=settings.start_timeout_s)
    print(f"migrations applied: {applied}" if applied else "schema up to date")


# The tenants table's CHECK, and what it does not say: a name an operator could not
# tell from another on screen (blank, padded) or that breaks the listings' lines.
TENANT_NAME_MAX = 200


def tenant_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a tenant, or None. Pure."""
    if not name.strip():
        return "must not be empty or blank"
    if len(name) > TENANT_NAME_MAX:
        return f"must be at most {TENANT_NAME_MAX} characters, not {len(name)}"
    if name != name.strip():
        return "must not start or end with white space"
    if _CONTROL.search(name):
        return "must not hold control characters"
    return None


async def _keys_create(
    settings: CommonSettings, tenant: str, label: str | None, given: str | None
) -> None:
    if (problem := tenant_name_problem(tenant)) is not None:
        raise ConfigError(f"--tenant {problem}")
    if given is None:
        new = keys.generate("live" if label is None else label)
    else:
        # "-": from stdin, where no other user of the machine can read it (an argument
        # shows in every process listing).
        new = _given_key(sys.stdin.readline().strip() if given == "-" else given, label)
    async with _database(settings) as conn, conn.transaction():
        tenant_id = await conn.fetchval(
            "INSERT INTO tenants (id, name) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            uuid7(),
            tenant,
        )
        inserted = await conn.fetchval(
            "INSERT INTO api_keys (key_id, tenant_id, label, secret_hash)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO NOTHING RETURNING key_id",
            new.key_id,
            tenant_id,
            new.label,
            new.secret_hash,
        )
        if inserted is None:  # only a given key can meet its id (12 random characters)
            revoked = await conn.fetchval(
                "SELECT revoked_at IS NOT NULL FROM api_keys WHERE key_id = $1", new.key_id
            )
            why = "it was revoked" if revoked else "a key is registered once"
            raise ValueError(f"key id {new.key_id} is taken: {why}")
    print(f"tenant {tenant} ({tenant_id}), key id {new.key_id}", file=sys.stderr)
    print(new.key)


def _given_key(key: str, label: str | None) -> keys.NewKey:
    """A key made elsewhere (``--key``: ``make up``'s LONGHAUL_DEV_API_KEY, a key kept in
    a secret store), registered as it is."""
    parsed = keys.parse(key)
    if parsed is None:
        raise ValueError("--key is not a Longhaul API key (lh_<label>_<12 id chars>_<secret>)")
    if label is not None and label != parsed.label:
        raise ValueError(f"--label {label} disagrees with the key's own label {parsed.label}")
    return keys.NewKey(
        key=key,
        key_id=parsed.key_id,
        label=parsed.label,
        secret_hash=keys.hash_secret(parsed.secret),
    )


async def _keys_revoke(settings: CommonSettings, key_id: str) -> None:
    wanted = keys.key_id_of(key_id)
    async with _database(settings) as conn:
        # Idempotent: a revoked key keeps the time of its first revocation.
        row = await conn.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1"
            " RETURNING revoked_at = now() AS now",
            wanted,
        )
    if row is None:
        raise ConfigError(f"no key with id {wanted}")
    print(f"revoked {wanted}" if row["now"] else f"{wanted} was already revoked")


async def _keys_list(settings: CommonSettings, tenant: str | None) -> None:
    async with _database(settings) as conn:
        rows = await conn.fetch(
            "SELECT k.key_id, k.label, t.name, k.created_at, k.revoked_at FROM api_keys k "
            "JOIN tenants t ON t.id = k.tenant_id WHERE $1::text IS NULL OR t.name = $1 "
            "ORDER BY k.created_at",
            tenant,
        )
    for r in rows:
        state = "revoked" if r["revoked_at"] else "active"
        print(f"lh_{r['label']}_{r['key_id']}_…\t{r['name']}\t{r['created_at']:%Y-%m-%d}\t{state}")


async def _tenants_list(settings: CommonSettings) -> None:
    async with _database(settings) as conn:
        rows = await conn.fetch(
            "SELECT t.id, t.name, t.rate_limit_per_s, t.rate_burst,"
            " count(k.key_id) FILTER (WHERE k.revoked_at IS NULL) AS active_keys"
            " FROM tenants t LEFT JOIN api_keys k ON k.tenant_id = t.id"
            " GROUP BY t.id ORDER BY t.name"
        )
    for r in rows:
        print(
            f"{terminal_safe(r['name'])}\t{r['id']}\t{_limits(r['rate_limit_per_s'], r['rate_burst'])}"
            f"\tactive keys={r['active_keys']}"
        )
    if not rows:
        print("no tenants", file=sys.stderr)


def _limits(rate: float | None, burst: int | None, sep: str = "\t") -> str:
    """A tenant's rate limit as the API applies it: its own values, or the API's
    LONGHAUL_RATE_LIMIT_PER_S / _BURST where it has none. Pure."""
    shown_rate = "default" if rate is None else f"{rate:g}/s"
    shown_burst = "default" if burst is None else str(burst)
    return f"rate={shown_rate}{sep}burst={shown_burst}"


async def _tenants_limit(
    settings: CommonSettings, tenant: str, rate: float | None, burst: int | None, clear: bool
) -> None:
    if clear == (rate is not None or burst is not None):
        raise ConfigError("give --rate and/or --burst, or --default alone")
    async with _database(settings) as conn:
        # --default clears both; otherwise a value not given is kept.
        row = await conn.fetchrow(
            "UPDATE tenants SET"
            " rate_limit_per_s = CASE WHEN $2 THEN NULL ELSE coalesce($3, rate_limit_per_s) END,"
            " rate_burst = CASE WHEN $2 THEN NULL ELSE coalesce($4, rate_burst) END"
            " WHERE name = $1 RETURNING rate_limit_per_s, rate_burst",
            tenant,
            clear,
            rate,
            burst,
        )
    if row is None:
        raise ConfigError(f"no tenant named {terminal_safe(tenant)!r}")
    limits = _limits(row["rate_limit_per_s"], row["rate_burst"], ", ")
    print(f"tenant {terminal_safe(tenant)}: {limits} (every API within LONGHAUL_AUTH_CACHE_S)")


async def _dlq_list(settings: CommonSettings, limit: int) -> None:
    async with _database(settings) as conn:
        rows = await deadletters.list_page(conn, None, None, limit)
        tenants = {
            r["id"]: r["name"]
            for r in await conn.fetch(
                "SELECT id, name FROM tenants WHERE id = ANY($1::uuid[])",
                list({r["tenant_id"] for r in rows if r["tenant_id"] is not None}),
            )
        }
    for r in rows:
        state = "redriven" if r["redriven_at"] else "waiting"
        # The detail quotes a handler's error, a tenant's text: no control character of
        # it reaches the operator's terminal (a line of its own, an escape sequence).
        detail = terminal_safe((r["detail"] or "")[:120])
        # By name, as `keys` shows tenants; "-": a message that named none (malformed).
        tenant = "-" if r["tenant_id"] is None else tenants.get(r["tenant_id"], r["tenant_id"])
        print(
            f"{r['id']}\t{r['created_at']:%Y-%m-%d %H:%M:%S}\t{terminal_safe(r['reason'])}\t"
            f"tenant={terminal_safe(str(tenant))}\ttask={r['task_id'] or '-'}\t{state}\t"
            f"{detail}"
        )
    if not rows:
        print("no dead letters", file=sys.stderr)


async def _schedules_list(settings: CommonSettings, tenant: str | None, limit: int) -> None:
    async with _database(settings) as conn:
        tenant_id = None
        if tenant is not None:
            tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", tenant)
            if tenant_id is None:
                raise ConfigError(f"no tenant named {terminal_safe(tenant)!r}")
        rows = await schedules.list_page(conn, tenant_id, None, limit)
        tenants = {
            r["id"]: r["name"]
            for r in await conn.fetch(
                "SELECT id, name FROM tenants WHERE id = ANY($1::uuid[])",
                list({r["tenant_id"] for r in rows}),
            )
        }
    for r in rows:
        state = "enabled" if r["enabled"] else "disabled"
        nxt = "-" if r["next_run_at"] is None else f"{r['next_run_at']:%Y-%m-%d %H:%M}"
        # Names, expressions and errors are a tenant's text: escaped, as dead letters'.
        print(
            f"{r['id']}\ttenant={terminal_safe(str(tenants.get(r['tenant_id'], r['tenant_id'])))}"
            f"\t{terminal_safe(r['name'])}\t{terminal_safe(r['cron'])}\t{r['type']}\t{state}"
            f"\tnext={nxt}\tlast_task={r['last_task_id'] or '-'}"
            f"\t{terminal_safe((r['last_error'] or '')[:120])}"
        )
    if not rows:
        print("no schedules", file=sys.stderr)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with its control characters (C0, DEL, C1) written as escapes. Pure."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


async def _dlq_redrive(settings: CommonSettings, dead_letter_id: str) -> None:
    try:
        wanted = UUID(dead_letter_id)
    except ValueError:
        raise ConfigError(f"not a dead letter id: {dead_letter_id}") from None
    async with _database(settings) as conn, conn.transaction():
        result = await deadletters.redrive(conn, wanted, None, EVENT_COLUMNS)
    if result.outcome is not deadletters.Redrive.DONE or result.task is None:
        raise ConfigError(f"cannot redrive {wanted}: {result.outcome.value}")
    if not await _announce(settings, result.task):
        print(
            "warning: the task's queued event was not written to Redis; its watchers "
            "see it queued when a worker takes it",
            file=sys.stderr,
        )
    print(f"task {result.task['id']} queued again as attempt {result.task['attempts'] + 1}")


async def _announce(settings: CommonSettings, row: Row) -> bool:
    """The redriven task's queued event, as the API's redrive writes it: clients that
    watch the task see it queued again now. Best effort, the redrive being committed:
    without it the event reaches the stream only with the claim of a worker (as
    backfill, not published), and never while no worker runs the type."""
    redis = create_client(settings.redis_url, settings.io_timeout_s)
    try:
        sink = EventSink(
            redis,
            Wire(settings.namespace),
            retention_s=settings.event_retention_s,
            maxlen=settings.event_stream_maxlen,
        )
        return await sink.emit([event_from_row(row)])
    finally:
        await redis.aclose()


async def _namespace_delete(
    settings: CommonSettings, named: str, *, yes: bool, force: bool, drop_database: bool
) -> None:
    # Typed out, as a DROP names what it drops: LONGHAUL_NAMESPACE unset means the
    # default namespace, which is not what an operator means to delete by accident.
    if named != settings.namespace:
        raise ConfigError(
            f"{terminal_safe(named)} is not this environment's namespace"
            f" (LONGHAUL_NAMESPACE={settings.namespace}): set LONGHAUL_NAMESPACE and the"
            " URLs of the deployment to delete"
        )
    found = await decommission.survey(settings, database=drop_database)
    if (why := decommission.refusal(found, force=force)) is not None:
        raise Refused(why)
    for line in decommission.describe(found):
        print(line)
    if not yes:
        print("dry run: nothing deleted; --yes deletes the above")
        return
    done = await decommission.delete(settings, found, force=force)
    for line in decommission.summary(settings.namespace, done):
        print(line)


def _positive(text: str) -> int:
    """argparse's type for a count: its own one-line error, not PostgreSQL's."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def _rate(text: str) -> float:
    """argparse's type for requests per second: a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longhaul", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="bring the database schema up to date (idempotent)")
    keys_p = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a tenant if needed and a key for it")
    create.add_argument("--tenant", required=True)
    create.add_argument("--label", help="shown in the key: lh_<label>_... (default: live)")
    create.add_argument(
        "--key",
        help="register this key (made elsewhere) instead of making one; '-' reads it from stdin",
    )
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (or the whole key)")
    revoke.add_argument("key_id")
    listing = keys_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant")
    tenants = sub.add_parser("tenants", help="list tenants; set a tenant's own rate limit")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    tenants_sub.add_parser("list", help="tenants, their rate limits and active key counts")
    limit = tenants_sub.add_parser(
        "limit",
        help="set a tenant's own rate limit (requests/s and burst) or go back to the default",
    )
    limit.add_argument("tenant", help="the tenant's name")
    limit.add_argument("--rate", type=_rate, help="requests per second (a value above 0)")
    limit.add_argument("--burst", type=_positive, help="the bucket's size (at least 1)")
    limit.add_argument(
        "--default",
        action="store_true",
        dest="clear",
        help="use the API's LONGHAUL_RATE_LIMIT_PER_S / _BURST again",
    )
    dlq = sub.add_parser("dlq", help="dead letters: messages that could not be processed")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="newest first, every tenant's")
    dlq_list.add_argument("--limit", type=_positive, default=50)
    dlq_redrive = dlq_sub.add_parser("redrive", help="run a dead letter's task again")
    dlq_redrive.add_argument("id")
    sched = sub.add_parser("schedules", help="periodic tasks (made with POST /v1/schedules)")
    sched_sub = sched.add_subparsers(dest="schedules_command", required=True)
    sched_list = sched_sub.add_parser(
        "list", help="newest first, every tenant's: next fire (UTC), last task, last error"
    )
    sched_list.add_argument("--tenant", help="only this tenant's (its name)")
    sched_list.add_argument("--limit", type=_positive, default=50)
    namespace = sub.add_parser("namespace", help="decommission the namespace (LONGHAUL_NAMESPACE)")
    namespace_sub = namespace.add_subparsers(dest="namespace_command", required=True)
    delete = namespace_sub.add_parser(
        "delete",
        help="delete its queues, exchanges and Redis keys (a dry run without --yes)",
        description="Delete the namespace's RabbitMQ queues and exchanges and its Redis keys;"
        " its PostgreSQL database only with --drop-database. Without --yes, list them and"
        " delete nothing. Refused while its queues have consumers or messages, or (with"
        " --drop-database) its database has sessions, unless --force.",
    )
    delete.add_argument("name", help="the namespace: must be LONGHAUL_NAMESPACE")
    delete.add_argument("--yes", action="store_true", help="delete (without it: a dry run)")
    delete.add_argument(
        "--force",
        action="store_true",
        help="delete even what is in use: queues with consumers or messages, and (with"
        " --drop-database) a database with sessions, which are ended",
    )
    delete.add_argument(
        "--drop-database",
        action="store_true",
        help="also drop the PostgreSQL database of LONGHAUL_DATABASE_URL",
    )
    for subparsers in (sub, keys_sub, tenants_sub, dlq_sub, sched_sub, namespace_sub):
        # A missing command is told by its choices ("required: {migrate,keys,dlq}"),
        # as the usage shows them, not by the dest that dispatches on it.
        subparsers.metavar = "{" + ",".join(subparsers.choices) + "}"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A failure is told once, in the command's own line: not again by the AMQP client's
    # log of it (Python prints a library's errors when no logging is set up).
    for library in ("aiormq", "aio_pika"):
        logging.getLogger(library).setLevel(logging.CRITICAL)
    try:
        settings = load(CommonSettings)
        if args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.command == "tenants":
            if args.tenants_command == "list":
                asyncio.run(_tenants_list(settings))
            else:
                asyncio.run(
                    _tenants_limit(settings, args.tenant, args.rate, args.burst, args.clear)
                )
        elif args.command == "schedules":
            asyncio.run(_schedules_list(settings, args.tenant, args.limit))
        elif args.command == "namespace":
            asyncio.run(
                _namespace_delete(
                    settings,
                    args.name,
                    yes=args.yes,
                    force=args.force,
                    drop_database=args.drop_database,
                )
            )
        elif args.command == "dlq":
            if args.dlq_command == "list":
                asyncio.run(_dlq_list(settings, args.limit))
            else:
                asyncio.run(_dlq_redrive(settings, args.id))
        elif args.keys_command == "create":
            asyncio.run(_keys_create(settings, args.tenant, args.label, args.key))
        elif args.keys_command == "revoke":
            asyncio.run(_keys_revoke(settings, args.key_id))
        else:
            asyncio.run(_keys_list(settings, args.tenant))
    except Refused as exc:  # in use: the command stopped before deleting that
        print(f"longhaul: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"longhaul: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # First: asyncpg's configuration errors (a bad DSN) are InterfaceErrors too.
        print(f"longhaul: {exc}", file=sys.stderr)
        return 2
    except DependencyError as exc:  # PostgreSQL unreachable for the start timeout
        print(f"longhaul: {exc}", file=sys.stderr)
        return 3
    except ANY_PG_ERROR as exc:
        print(f"longhaul: PostgreSQL at {redacted(settings.database_url)}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
