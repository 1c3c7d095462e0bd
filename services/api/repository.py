"""The API's SQL, all of it. Inserting a task and its outbox row is one transaction:
there is no moment where a task is accepted but has nothing to publish it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from shared import deadletters, newtasks, outbox, schedules
from shared.db import ANY_PG_ERROR, NOTIFY_CHANNEL, TRANSIENT_ERRORS
from shared.groupcommit import GroupCommit
from shared.ids import uuid7
from shared.newtasks import TASK_COLUMNS, NewTask
from shared.relay import Handed
from shared.schemas import ScheduleRequest, ScheduleUpdate
from shared.taskrows import Row
from shared.tasktypes import TYPE_COLUMNS

log = logging.getLogger(__name__)

# An insert whose reply was lost: end its backend, so that it cannot commit later
# (asyncpg's own timeout leaves it running), if it is still there. A backend of the API's
# own role may be ended by that role (no superuser needed). The database and role are
# matched too, lest a pid reused meanwhile be someone else's.
_END_BACKEND = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE pid = $1 AND datname = current_database() AND usename = current_user
"""
_BACKEND_ALIVE = "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND datname = current_database()"


_RELEASE_CLAIMS = """
UPDATE outbox SET claimed_until = NULL, claimed_by = NULL
WHERE task_id = ANY($1::uuid[]) AND claimed_until IS NOT NULL
"""


class ScheduleLimit(Exception):
    """The tenant has as many schedules as LONGHAUL_MAX_SCHEDULES_PER_TENANT allows."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class OutcomeUnknown(Exception):
    """The connection broke while tasks were being inserted, and whether they were
    stored could not be found out (PostgreSQL away): they may run, or not."""


# Errors PostgreSQL reports itself, the statement over and its transaction rolled back
# (slow, or refused before it started): the insert surely did not commit.
_SURELY_NOT_COMMITTED = (
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    asyncpg.CannotConnectNowError,
)


def reply_lost(exc: BaseException) -> bool:
    """Whether an insert that raised ``exc`` may have committed: the connection broke
    or our own timeout fired after the statement may have reached the server. A
    statement error (a constraint, bad data, statement_timeout) is the server's answer:
    nothing was committed. Pure."""
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, _SURELY_NOT_COMMITTED)


def committed(ids: Sequence[UUID], found: Collection[UUID]) -> bool:
    """Whether an insert of tasks ``ids`` committed, from the ids found stored after its
    backend ended. One statement: all or none; anything else is a bug. Pure."""
    present = [i for i in ids if i in found]
    if present and len(present) != len(ids):
        raise RuntimeError(f"an insert committed {len(present)} of its {len(ids)} tasks")
    return bool(present)


# A task's id time (UUIDv7: the first 48 bits are Unix ms, the API's clock when it took
# the request) and its created_at (PostgreSQL's now() at the insert) are most often
# milliseconds apart, further when clocks disagree or the insert waited, and anything
# for an id not made by uuid7(). The tasks whose two are more than a minute apart are
# indexed apart (tasks_id_time_apart, shared/migrations/0014_tasks_id_time_apart.sql):
# a query names this very predicate for PostgreSQL to use that index.
_ID_TIME = (
    "to_timestamp(('x' || translate(left(id::text, 13), '-', ''))::bit(48)::bigint"
    " / 1000.0::float8)"
)
_ID_TIME_APART = f"created_at - {_ID_TIME} NOT BETWEEN interval '-1 minute' AND interval '1 minute'"
# The id range of a time window is a second wider than that minute: to_timestamp()
# rounds an id's time to a microsecond, and no task left out of the index may fall
# outside the range.
_ID_TIME_SLACK_MS = 61_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS_MAX = (1 << 48) - 1


def id_range(created_after: datetime | None, created_before: datetime | None) -> tuple[UUID, UUID]:
    """The lowest and highest id a task created in [created_after, created_before) can
    have, unless it is in the index of tasks whose id time is apart from created_at. Pure."""

    def ms(value: datetime | None, default: int, slack: int) -> int:
        if value is None:
            return default
        return min(max((value - _EPOCH) // timedelta(milliseconds=1) + slack, 0), _MS_MAX)

    low = ms(created_after, 0, -_ID_TIME_SLACK_MS)
    high = ms(created_before, _MS_MAX, _ID_TIME_SLACK_MS)
    return UUID(int=low << 80), UUID(int=((high + 1) << 80) - 1)


def list_statement(
    tenant_id: UUID,
    *,
    state: str | None,
    type_: str | None,
    before: UUID | None,
    limit: int,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> tuple[str, list[Any]]:
    """A page of the tenant's tasks, newest first: the SQL and its arguments. ``before``
    is the last id of the previous page (UUIDv7 ids sort by creation time, so this is a
    keyset page on the primary key order). Pure.

    With a time window, on created_at exactly, the tasks are read in two parts merged
    by id: those within ``id_range`` of the window (a range of the same indexes as
    without one), and those of the small index of tasks whose id time is apart from
    their created_at, for which the range says nothing."""
    where = ["tenant_id = $1"]
    args: list[Any] = [tenant_id]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    for column, value in (("state", state), ("type", type_)):
        if value is not None:
            where.append(f"{column} = {arg(value)}")
    if before is not None:
        where.append(f"id < {arg(before)}")
    if created_after is not None:
        where.append(f"created_at >= {arg(created_after)}")
    if created_before is not None:
        where.append(f"created_at < {arg(created_before)}")
    top = arg(limit)

    def page(conditions: list[str]) -> str:
        return (
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(conditions)} "
            f"ORDER BY id DESC LIMIT {top}"
        )

    if created_after is None and created_before is None:
        return page(where), args
    low, high = id_range(created_after, created_before)
    ids = f"id BETWEEN {arg(low)} AND {arg(high)}"
    near = page([*where, ids])
    apart = page([*where, _ID_TIME_APART, f"NOT {ids}"])
    return f"({near}) UNION ALL ({apart}) ORDER BY id DESC LIMIT {top}", args


@dataclass(frozen=True)
class Principal:
    tenant_id: UUID
    key_id: str
    rate_limit_per_s: float | None
    rate_burst: int | None


# Receives the first attempts just committed and claimed.
HandOver = Callable[[list[Handed]], None]


class ApiRepository:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        timeout: float,
        hand_over: HandOver | None = None,
        claim_s: float = 0.0,
        owner: Callable[[], int | None] | None = None,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        # With a relay in this process, fresh tasks go to it straight from the insert
        # (claimed for claim_s, by the relay's owner key when it has one); without one, a
        # NOTIFY wakes the other processes' relays.
        self._hand_over = hand_over
        self._claim_s = claim_s if hand_over is not None else None
        self._owner = owner if hand_over is not None else None
        # One request's bad row (its tenant deleted meanwhile, say) fails only that
        # request: the others of its batch are inserted one by one.
        self._grouped: GroupCommit[tuple[UUID, NewTask], Row] = GroupCommit(
            self._insert_group, name="task-inserts", alone_on=_bad_row
        )

    async def aclose(self) -> None:
        """Wait for the inserts being written (shutdown)."""
        await self._grouped.aclose()

    async def api_key(self, key_id: str) -> tuple[bytes, Principal] | None:
        row = await self._fetchrow(
            "SELECT k.secret_hash, k.tenant_id, t.rate_limit_per_s, t.rate_burst "
            "FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
            "WHERE k.key_id = $1 AND k.revoked_at IS NULL",
            key_id,
        )
        if row is None:
            return None
        return bytes(row["secret_hash"]), Principal(
            row["tenant_id"], key_id, row["rate_limit_per_s"], row["rate_burst"]
        )

    async def task_types(self) -> list[Row]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return list(await conn.fetch(f"SELECT {TYPE_COLUMNS} FROM task_types ORDER BY name"))

    async def insert(
        self,
        tenant_id: UUID,
        tasks: Sequence[NewTask],
        idempotency_keys: Sequence[str] | None = None,
        request_hash: bytes | None = None,
    ) -> list[Row]:
        """Insert tasks (state queued, seq 1) and their first outbox rows, atomically.

        One statement, so one round trip and its own transaction: the hot path of the
        API. Single tasks without an idempotency key share the statement with those of
        concurrent requests (group commit). With idempotency keys (one per task), if an
        earlier task of this tenant holds any of them, it wins and nothing is inserted:
        the caller gets an empty list."""
        if idempotency_keys is None and len(tasks) == 1:
            return [await self._grouped.submit((tenant_id, tasks[0]))]
        return await self._insert([tenant_id] * len(tasks), tasks, idempotency_keys, request_hash)

    async def _insert_group(self, items: list[tuple[UUID, NewTask]]) -> list[Row]:
        rows = await self._insert([t for t, _ in items], [n for _, n in items])
        by_id = {row["id"]: row for row in rows}
        return [by_id[n.id] for _, n in items]

    async def _insert(
        self,
        tenant_ids: Sequence[UUID],
        tasks: Sequence[NewTask],
        idempotency_keys: Sequence[str] | None = None,
        request_hash: bytes | None = None,
    ) -> list[Row]:
        bodies = newtasks.bodies(tenant_ids, tasks)
        async with self._pool.acquire(timeout=self._timeout) as conn:
            pid = conn.get_server_pid()
            # Just before the statement, whose now() the claims start from: a claim
            # lapses no earlier than this.
            claimed_until = time.monotonic() + (self._claim_s or 0.0)
            lost: Exception | None = None
            try:
                rows = await self._execute(
                    conn, tenant_ids, tasks, bodies, idempotency_keys, request_hash
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != newtasks.IDEMPOTENCY_INDEX:
                    raise
                return []
            except Exception as exc:
                if not reply_lost(exc):
                    raise
                # Not back to the pool, which may have let go of it already (closed).
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                lost = exc
            else:
                if rows and self._hand_over is None:
                    await self._notify(conn)
        if lost is not None:
            # Not handed over (nor announced): the check releases their outbox rows'
            # claims, and any relay's next poll publishes them (shared/relay.py, _CLAIM).
            return await self._after_lost_reply(pid, [t.id for t in tasks], lost)
        if rows and self._hand_over is not None:
            # Their queued event (seq 1) is not written to Redis: nobody can watch them
            # yet, and the gateway sends it from the row until the worker's claim
            # backfills it into the stream. Nothing stands between commit and publish.
            body_of = {t.id: body for t, body in zip(tasks, bodies, strict=True)}
            self._hand_over(
                [
                    Handed(r["outbox_id"], r["id"], body_of[r["id"]], claimed_until, r["priority"])
                    for r in rows
                    if r["next_attempt_at"] is None
                ]
            )
        return rows

    async def _execute(
        self,
        conn: outbox.Connection,
        tenant_ids: Sequence[UUID],
        tasks: Sequence[NewTask],
        bodies: Sequence[bytes],
        idempotency_keys: Sequence[str] | None,
        request_hash: bytes | None,
    ) -> list[Row]:
        return await newtasks.insert(
            conn,
            tenant_ids,
            tasks,
            bodies,
            idempotency_keys=idempotency_keys,
            request_hash=request_hash,
            claim_s=self._claim_s,
            owner=self._owner() if self._owner is not None else None,
        )

    async def _notify(self, conn: outbox.Connection) -> None:
        """Wake the other processes' relays. The tasks are committed: a failure here
        costs a wake-up (the relays poll anyway), not the request."""
        try:
            await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        except ANY_PG_ERROR as exc:
            log.warning("relays not notified of new tasks", extra={"error": str(exc)[:300]})

    async def _after_lost_reply(self, pid: int, ids: list[UUID], lost: Exception) -> list[Row]:
        """The insert of tasks ``ids`` on backend ``pid`` lost its reply: its rows if it
        committed, else ``lost`` raised again (it surely did not), or OutcomeUnknown.

        The backend is ended first and waited for: one that is gone has committed or
        rolled back, and the tasks' rows then say which. For a group commit this is
        one check for every request of the group."""
        log.warning("the reply to a task insert was lost; checking", extra={"error": repr(lost)})
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                await conn.execute(_END_BACKEND, pid)
                deadline = time.monotonic() + self._timeout
                pause = 0.005
                while await conn.fetchval(_BACKEND_ALIVE, pid) is not None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"backend {pid} still there after {self._timeout}s")
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.1)
                rows: list[Row] = list(
                    await conn.fetch(
                        f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1::uuid[])", ids
                    )
                )
        except ANY_PG_ERROR as exc:
            raise OutcomeUnknown(f"{lost!r}, then checking: {exc!r}") from lost
        if not committed(ids, {r["id"] for r in rows}):
            raise lost
        log.warning("a task insert whose reply was lost had committed", extra={"count": len(ids)})
        try:
            # Their claim is ours and held (our relay's lock), so neither it nor the
            # orphan release would let them go before it lapses: for the next poll now.
            async with self._pool.acquire(timeout=self._timeout) as conn:
                await conn.execute(_RELEASE_CLAIMS, ids)
        except ANY_PG_ERROR as exc:
            log.warning(
                "claims not released: published once they lapse", extra={"error": repr(exc)}
            )
        return rows

    async def by_idempotency_keys(self, tenant_id: UUID, keys: Sequence[str]) -> list[Row]:
        """The tenant's tasks stored under any of ``keys``, each with its key."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return list(
                await conn.fetch(
                    f"SELECT {TASK_COLUMNS}, idempotency_key FROM tasks"
                    " WHERE tenant_id = $1 AND idempotency_key = ANY($2::text[])",
                    tenant_id,
                    list(keys),
                )
            )

    async def get(self, tenant_id: UUID, task_id: UUID) -> Row | None:
        return await self._fetchrow(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND tenant_id = $2", task_id, tenant_id
        )

    async def list_tasks(
        self,
        tenant_id: UUID,
        *,
        state: str | None,
        type_: str | None,
        before: UUID | None,
        limit: int,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> list[Row]:
        """Newest first (see ``list_statement``)."""
        sql, args = list_statement(
            tenant_id,
            state=state,
            type_=type_,
            before=before,
            limit=limit,
            created_after=created_after,
            created_before=created_before,
        )
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return list(await conn.fetch(sql, *args))

    async def cancel(self, tenant_id: UUID, task_id: UUID) -> tuple[str, Row | None]:
        """Cancel a task. Returns ("cancelled", row) for a task that had not started,
        ("requested", row) for a running one (its worker is told), ("terminal", row) or
        ("missing", None)."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            # Locked first, then decided on: with an UPDATE per state, a worker moving
            # the task between them (running to retrying) left it matching neither,
            # and a live task was answered "already retrying" with a 409.
            state = await conn.fetchval(
                "SELECT state FROM tasks WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
                task_id,
                tenant_id,
            )
            if state is None:
                return "missing", None
            if state in ("queued", "retrying"):
                row = await conn.fetchrow(
                    f"""
                    UPDATE tasks SET state = 'cancelled', finished_at = now(),
                        next_attempt_at = NULL, last_seq = last_seq + 1, updated_at = now()
                    WHERE id = $1 RETURNING {TASK_COLUMNS}
                    """,
                    task_id,
                )
                await conn.execute("DELETE FROM outbox WHERE task_id = $1", task_id)
                return "cancelled", row
            if state == "running":
                row = await conn.fetchrow(
                    f"""
                    UPDATE tasks SET cancel_requested_at = coalesce(cancel_requested_at, now())
                    WHERE id = $1 RETURNING {TASK_COLUMNS}
                    """,
                    task_id,
                )
                return "requested", row
            row = await conn.fetchrow(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1", task_id)
            return "terminal", row

    async def retry(self, tenant_id: UUID, task_id: UUID) -> tuple[str, Row | None]:
        """Run a failed or cancelled task again as its next attempt. Returns ("queued",
        row), ("conflict", row) or ("missing", None)."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            row = await outbox.rerun(conn, task_id, tenant_id, TASK_COLUMNS)
        if row is not None:
            return "queued", row
        current = await self.get(tenant_id, task_id)
        return ("conflict", current) if current is not None else ("missing", None)

    async def dead_letters(self, tenant_id: UUID, before: UUID | None, limit: int) -> list[Row]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await deadletters.list_page(conn, tenant_id, before, limit)

    async def task_state(self, tenant_id: UUID, task_id: UUID) -> str | None:
        """Without the other columns: ``get`` reads args and result, which may be large."""
        row = await self._fetchrow(
            "SELECT state FROM tasks WHERE id = $1 AND tenant_id = $2", task_id, tenant_id
        )
        return None if row is None else str(row["state"])

    async def redrive_blocker(
        self, tenant_id: UUID, dead_letter_id: UUID
    ) -> deadletters.Redrive | None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await deadletters.redrive_blocker(conn, dead_letter_id, tenant_id)

    async def redrive(self, tenant_id: UUID, dead_letter_id: UUID) -> deadletters.RedriveResult:
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            return await deadletters.redrive(conn, dead_letter_id, tenant_id, TASK_COLUMNS)

    async def create_schedule(
        self,
        tenant_id: UUID,
        new: ScheduleRequest,
        first_run: Callable[[datetime], datetime | None],
        limit: int,
    ) -> Row | None:
        """Store a schedule; None when the tenant has one of that name. Its next fire
        time is ``first_run`` of the database's clock, which every fire time of the
        workers is compared with. ScheduleLimit when the tenant has ``limit`` already
        (counted first: concurrent creations may pass it by a few)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            held = await conn.fetchval(
                "SELECT count(*) FROM schedules WHERE tenant_id = $1", tenant_id
            )
            if held >= limit:
                raise ScheduleLimit(limit)
            now: datetime = await conn.fetchval("SELECT now()")
            try:
                return await conn.fetchrow(
                    f"""
                    INSERT INTO schedules (id, tenant_id, name, cron, type, args, priority,
                        max_attempts, timeout_s, enabled, next_run_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                    RETURNING {schedules.COLUMNS}
                    """,
                    uuid7(),
                    tenant_id,
                    new.name,
                    new.cron,
                    new.type,
                    new.args,
                    new.priority,
                    new.max_attempts,
                    new.timeout_s,
                    new.enabled,
                    first_run(now),
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != schedules.NAME_CONSTRAINT:
                    raise
                return None

    async def schedule(self, tenant_id: UUID, schedule_id: UUID) -> Row | None:
        return await self._fetchrow(
            f"SELECT {schedules.COLUMNS} FROM schedules WHERE id = $1 AND tenant_id = $2",
            schedule_id,
            tenant_id,
        )

    async def list_schedules(self, tenant_id: UUID, before: UUID | None, limit: int) -> list[Row]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await schedules.list_page(conn, tenant_id, before, limit)

    async def update_schedule(
        self,
        tenant_id: UUID,
        schedule_id: UUID,
        change: ScheduleUpdate,
        next_run: Callable[[Row, datetime], datetime | None],
    ) -> Row | None:
        """Apply ``change``; the row after it, or None (no such schedule). The next fire
        time is ``next_run`` of the locked row and the database's clock: a worker firing
        the schedule meanwhile is waited for, and the change applies to the row it left."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT enabled, cron, next_run_at, now() AS now FROM schedules"
                " WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
                schedule_id,
                tenant_id,
            )
            if row is None:
                return None
            return await conn.fetchrow(
                f"""
                UPDATE schedules SET enabled = coalesce($2, enabled), cron = coalesce($3, cron),
                    args = coalesce($4, args), next_run_at = $5, updated_at = now()
                WHERE id = $1
                RETURNING {schedules.COLUMNS}
                """,
                schedule_id,
                change.enabled,
                change.cron,
                change.args,
                next_run(row, row["now"]),
            )

    async def delete_schedule(self, tenant_id: UUID, schedule_id: UUID) -> bool:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            status: str = await conn.execute(
                "DELETE FROM schedules WHERE id = $1 AND tenant_id = $2", schedule_id, tenant_id
            )
        return status == "DELETE 1"

    async def ping(self) -> None:
        await self._fetchrow("SELECT 1")

    async def _fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await conn.fetchrow(sql, *args)


def _bad_row(exc: Exception) -> bool:
    """An error of the statement, not of the connection: worth trying row by row."""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, TRANSIENT_ERRORS)
