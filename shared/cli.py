"""The ``longhaul`` operator command: ``migrate`` and ``keys``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import asyncpg

from shared import keys
from shared.db import migrate
from shared.errors import ConfigError
from shared.ids import uuid7
from shared.settings import CommonSettings, load


async def _migrate(settings: CommonSettings) -> None:
    applied = await migrate(settings.database_url, timeout=settings.start_timeout_s)
    print(f"migrations applied: {applied}" if applied else "schema up to date")


async def _keys_create(settings: CommonSettings, tenant: str, label: str) -> None:
    new = keys.generate(label)
    conn = await asyncpg.connect(settings.database_url, timeout=settings.start_timeout_s)
    try:
        async with conn.transaction():
            tenant_id = await conn.fetchval(
                "INSERT INTO tenants (id, name) VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
                uuid7(),
                tenant,
            )
            await conn.execute(
                "INSERT INTO api_keys (key_id, tenant_id, label, secret_hash) VALUES ($1, $2, $3, $4)",
                new.key_id,
                tenant_id,
                new.label,
                new.secret_hash,
            )
    finally:
        await conn.close()
    print(f"tenant {tenant} ({tenant_id}), key id {new.key_id}", file=sys.stderr)
    print(new.key)


async def _keys_revoke(settings: CommonSettings, key_id: str) -> None:
    parsed = keys.parse(key_id)
    wanted = parsed.key_id if parsed else key_id
    conn = await asyncpg.connect(settings.database_url, timeout=settings.start_timeout_s)
    try:
        status = await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
            wanted,
        )
    finally:
        await conn.close()
    if status.endswith(" 0"):
        raise ConfigError(f"no active key with id {wanted}")
    print(f"revoked {wanted}")


async def _keys_list(settings: CommonSettings, tenant: str | None) -> None:
    conn = await asyncpg.connect(settings.database_url, timeout=settings.start_timeout_s)
    try:
        rows = await conn.fetch(
            "SELECT k.key_id, k.label, t.name, k.created_at, k.revoked_at FROM api_keys k "
            "JOIN tenants t ON t.id = k.tenant_id WHERE $1::text IS NULL OR t.name = $1 "
            "ORDER BY k.created_at",
            tenant,
        )
    finally:
        await conn.close()
    for r in rows:
        state = "revoked" if r["revoked_at"] else "active"
        print(f"lh_{r['label']}_{r['key_id']}_…\t{r['name']}\t{r['created_at']:%Y-%m-%d}\t{state}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longhaul", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="bring the database schema up to date (idempotent)")
    keys_p = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a tenant if needed and a key for it")
    create.add_argument("--tenant", required=True)
    create.add_argument("--label", default="live", help="shown in the key: lh_<label>_...")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (or the whole key)")
    revoke.add_argument("key_id")
    listing = keys_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load(CommonSettings)
        if args.command == "migrate":
            asyncio.run(_migrate(settings))
        elif args.keys_command == "create":
            asyncio.run(_keys_create(settings, args.tenant, args.label))
        elif args.keys_command == "revoke":
            asyncio.run(_keys_revoke(settings, args.key_id))
        else:
            asyncio.run(_keys_list(settings, args.tenant))
    except ConfigError as exc:
        print(f"longhaul: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"longhaul: PostgreSQL at {settings.database_url}: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"longhaul: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
