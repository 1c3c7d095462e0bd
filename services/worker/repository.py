"""The worker's SQL, all of it. Every state change is a conditional UPDATE fenced by the
expected state and attempt, so a duplicate delivery, a late worker or a reaped attempt
changes nothing; each returns the row's event columns (None when fenced out)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg
import orjson
from prometheus_client import Counter

from services.worker.progress import MAX_MESSAGE
from services.worker.schedules import DUE_COLUMNS, Fire
from services.worker.sdk import TaskSpec
from shared import deadletters, newtasks, outbox
from shared.db import NOTIFY_CHANNEL, TRANSIENT_ERRORS
from shared.groupcommit import GroupCommit
from shared.ids import uuid7
from shared.liveness import beat
from shared.outbox import Connection
from shared.schemas import TaskMessage
from shared.taskrows import EVENT_COLUMNS, PREVIOUS_COLUMNS, Row, qualified
from shared.tasktypes import TYPE_COLUMNS


def _reason(error: str) -> str:
    """SQL: the message of the jsonb ``error``, as its event's (and the row's) message,
    bounded as a handler's: a client learns why from the event, and a snapshot or a
    claim's backfill, rebuilt from the row, says the same."""
    return f"left(({error})::jsonb->>'message', {MAX_MESSAGE})"


# The per-task statements, built once: asyncpg finds its prepared statement by the text.
_CLAIM = f"""
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::uuid[], $4::text[],
                         $5::float8[])
        AS r(id, attempt, tenant_id, worker_id, lease_s)
), old AS (
    -- Not locked (FOR UPDATE doubled the statement's cost): the old values
    -- only rebuild the previous event, and previous_events() drops a row
    -- another writer changed in between.
    SELECT {EVENT_COLUMNS}, next_attempt_at FROM tasks WHERE id = ANY($1::uuid[])
)
UPDATE tasks AS t SET state = 'running', attempts = req.attempt,
    worker_id = req.worker_id,
    lease_expires_at = now() + make_interval(secs => req.lease_s),
    started_at = coalesce(t.started_at, now()), next_attempt_at = NULL,
    progress = 0, message = NULL, last_seq = t.last_seq + 1, updated_at = now()
FROM req JOIN old ON old.id = req.id
WHERE t.id = req.id AND t.state IN ('queued', 'retrying')
  AND t.attempts = req.attempt - 1 AND t.tenant_id = req.tenant_id
RETURNING {qualified("t")}, t.type, t.args, t.tenant_id, t.timeout_s,
          t.max_attempts, t.created_at, t.cancel_requested_at, t.backoff,
          {PREVIOUS_COLUMNS},
          -- Waited since it was queued, or since its delay or backoff ended: a metric.
          extract(epoch FROM now() - greatest(old.updated_at, old.next_attempt_at))::float8
              AS queued_s
"""

_PROGRESS = f"""
UPDATE tasks SET progress = greatest(progress, $3), message = $4,
    last_seq = last_seq + 1, updated_at = now()
WHERE id = $1 AND state = 'running' AND attempts = $2
RETURNING {EVENT_COLUMNS}
"""

_SUCCEED = f"""
UPDATE tasks AS t SET state = 'succeeded', progress = 1, result = u.result::jsonb,
    error = NULL, finished_at = now(), worker_id = NULL,
    lease_expires_at = NULL, last_seq = t.last_seq + 1, updated_at = now()
-- Results as JSON text: in a jsonb[] parameter, asyncpg takes a result that is a list
-- for one more dimension of the array ([1, 2, 3] was stored as 1).
FROM unnest($1::uuid[], $2::int[], $3::text[]) AS u(id, attempt, result)
WHERE t.id = u.id AND t.state = 'running' AND t.attempts = u.attempt
RETURNING {qualified("t")}
"""


class Renewal(NamedTuple):
    """What a lease renewal found: attempts asked to cancel, attempts no longer ours, and
    the attempts whose leases it extended (not those skipped as being written)."""

    cancel: list[UUID]
    lost: list[UUID]
    renewed: list[UUID]


@dataclass(frozen=True)
class Claimed:
    """A task this worker now runs as ``attempt``."""

    row: Row
    message: TaskMessage

    @property
    def args(self) -> dict[str, Any]:
        args: dict[str, Any] = self.row["args"]
        return args


@dataclass(frozen=True)
class _ClaimRequest:
    message: TaskMessage
    worker_id: str
    lease_s: float


# A claim or a success waits this long, at most, for those of other deliveries to share
# its statement. Without it a statement served about three tasks at saturation (the
# deliveries of one socket read) and one at moderate load: a PostgreSQL wake-up and
# commit each, and a worker round trip.
WRITE_LINGER_S = 0.002


class WorkerRepository:
    def __init__(self, pool: asyncpg.Pool, *, timeout: float, concurrency: int = 1) -> None:
        """``concurrency``: the deliveries the worker runs at once. Once that many wait
        for one statement, no other can join it: it goes without lingering."""
        self._pool = pool
        self._timeout = timeout
        # The two statements of every task: one round trip (and one commit) serves the
        # concurrent deliveries of the moment.
        # A task appears once per statement (a duplicate delivery's claim must see the
        # first one's); a deadlock with another writer is possible (rows are locked in
        # the plan's order): its batch is retried one by one.
        self._claims: GroupCommit[_ClaimRequest, Row | None] = GroupCommit(
            self._claim_rows,
            name="claim-writer",
            key=lambda r: r.message.task_id,
            alone_on=_deadlock,
            linger_s=WRITE_LINGER_S,
            enough=concurrency,
        )
        self._successes: GroupCommit[tuple[UUID, int, Any], Row | None] = GroupCommit(
            self._succeed_rows,
            name="success-writer",
            key=lambda r: r[0],
            alone_on=_deadlock,
            linger_s=WRITE_LINGER_S,
            enough=concurrency,
        )

    async def aclose(self) -> None:
        """Wait for the statements being written (shutdown)."""
        await self._claims.aclose()
        await self._successes.aclose()

    async def register_types(self, specs: Sequence[TaskSpec]) -> None:
        """The types this worker runs, with their args schema and the defaults the API
        gives their tasks (``@task(max_attempts=..., timeout_s=...)``)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.executemany(
                "INSERT INTO task_types (name, args_schema, max_attempts, timeout_s, seen_at)"
                " VALUES ($1, $2, $3, $4, now())"
                " ON CONFLICT (name) DO UPDATE SET args_schema = EXCLUDED.args_schema,"
                " max_attempts = EXCLUDED.max_attempts, timeout_s = EXCLUDED.timeout_s,"
                " registered_at = now(), seen_at = now()",
                [(s.name, s.args_schema(), s.max_attempts, s.timeout_s) for s in specs],
            )

    async def touch_types(self, names: Sequence[str]) -> None:
        """Say this worker still runs these types (see pass_on)."""
        await self._execute(
            "UPDATE task_types SET seen_at = now() WHERE name = ANY($1::text[])", list(names)
        )

    async def pass_on(self, message: TaskMessage, seen_within_s: float, delay_s: float) -> bool:
        """For a message of a type this worker lacks: when another worker said it runs
        the type within ``seen_within_s`` and the task still waits for this attempt,
        publish the same message again in ``delay_s`` (the outbox) and return True. The
        attempt is not used up: no handler ran."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            # Later by PostgreSQL's clock, as every time of the outbox: a worker's clock
            # set apart would hold the message back or let it out at once (a spin).
            later = await conn.fetchval(
                """
                SELECT now() + make_interval(secs => $6)
                FROM tasks t JOIN task_types tt ON tt.name = t.type
                WHERE t.id = $1 AND t.tenant_id = $2 AND t.type = $3
                  AND t.state IN ('queued', 'retrying') AND t.attempts = $4 - 1
                  AND tt.seen_at > now() - make_interval(secs => $5)
                FOR UPDATE OF t
                """,
                message.task_id,
                message.tenant_id,
                message.type,
                message.attempt,
                seen_within_s,
                delay_s,
            )
            if later is None:
                return False
            await outbox.enqueue(conn, [outbox.Scheduled(message, later)])
            return True

    async def claim(self, message: TaskMessage, worker_id: str, lease_s: float) -> Claimed | None:
        """Start ``message.attempt`` if the task is waiting for exactly that attempt.
        Claims of concurrent deliveries share one statement (group commit)."""
        row = await self._claims.submit(_ClaimRequest(message, worker_id, lease_s))
        return Claimed(row, message) if row else None

    async def _claim_rows(self, reqs: list[_ClaimRequest]) -> list[Row | None]:
        rows = await self._fetch(
            _CLAIM,
            [r.message.task_id for r in reqs],
            [r.message.attempt for r in reqs],
            [r.message.tenant_id for r in reqs],
            [r.worker_id for r in reqs],
            [r.lease_s for r in reqs],
        )
        by_id = {row["id"]: row for row in rows}
        return [by_id.get(r.message.task_id) for r in reqs]

    async def progress(
        self, task_id: UUID, attempt: int, progress: float, message: str | None
    ) -> Row | None:
        return await self._fetchrow(
            _PROGRESS,
            task_id,
            attempt,
            progress,
            message,
        )

    async def succeed(self, task_id: UUID, attempt: int, result: Any) -> Row | None:
        """End the attempt as ``succeeded``; shares a statement with concurrent ones."""
        return await self._successes.submit((task_id, attempt, result))

    async def _succeed_rows(self, reqs: list[tuple[UUID, int, Any]]) -> list[Row | None]:
        rows = await self._fetch(
            _SUCCEED,
            [r[0] for r in reqs],
            [r[1] for r in reqs],
            [orjson.dumps(r[2]).decode() for r in reqs],
        )
        by_id = {row["id"]: row for row in rows}
        return [by_id.get(r[0]) for r in reqs]

    async def finish(
        self, task_id: UUID, attempt: int, state: str, error: dict[str, Any] | None
    ) -> Row | None:
        """End the attempt as ``failed`` or ``cancelled``."""
        return await self._fetchrow(_FINISH, task_id, attempt, state, error)

    async def exhaust(self, message: TaskMessage, error: dict[str, Any]) -> Row | None:
        """Fail the task's last attempt and keep its message as a dead letter (its
        attempts ran out), in one transaction."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            row: Row | None = await conn.fetchrow(
                _FINISH, message.task_id, message.attempt, "failed", error
            )
            if row is not None:
                _kept(deadletters.EXHAUSTED, await deadletters.keep_exhausted(conn, [message]))
            return row

    async def fail_and_keep(
        self, message: TaskMessage, error: dict[str, Any], letter: Letter
    ) -> Row | None:
        """Fail the attempt and keep its message as a dead letter (it can never run
        here), in one transaction: a task failed without it could not be redriven."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            row: Row | None = await conn.fetchrow(
                _FINISH, message.task_id, message.attempt, "failed", error
            )
            await letter.keep(conn, message.tenant_id, message.task_id)
            return row

    async def retry_later(
        self, message: TaskMessage, error: dict[str, Any], delay_s: float
    ) -> Row | None:
        """Mark the attempt ``retrying`` and schedule the next one in the outbox, at once;
        or ``cancelled`` when a cancel was asked for that this worker had not yet seen
        (its control message missed, or in flight while the attempt failed): no retry
        of a task its client has cancelled, after a backoff of up to a day."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""
                UPDATE tasks SET
                    state = CASE WHEN cancel_requested_at IS NULL THEN 'retrying'
                                 ELSE 'cancelled' END,
                    error = CASE WHEN cancel_requested_at IS NULL THEN $3::jsonb END,
                    message = CASE WHEN cancel_requested_at IS NULL THEN {_reason("$3")}
                                   ELSE message END,
                    finished_at = CASE WHEN cancel_requested_at IS NOT NULL THEN now()
                                       ELSE finished_at END,
                    next_attempt_at = CASE WHEN cancel_requested_at IS NULL
                                           THEN now() + make_interval(secs => $4) END,
                    worker_id = NULL, lease_expires_at = NULL,
                    last_seq = last_seq + 1, updated_at = now()
                WHERE id = $1 AND state = 'running' AND attempts = $2
                RETURNING {EVENT_COLUMNS}, next_attempt_at
                """,
                message.task_id,
                message.attempt,
                error,
                delay_s,
            )
            if row is not None and row["state"] == "retrying":
                await outbox.enqueue(
                    conn,
                    [
                        outbox.Scheduled(
                            message.model_copy(update={"attempt": message.attempt + 1}),
                            row["next_attempt_at"],
                        )
                    ],
                )
            return row

    async def hand_back(self, messages: Sequence[TaskMessage], error: dict[str, Any]) -> list[Row]:
        """Hand back attempts this stopping worker interrupted: their next attempts are
        published at once. The operator stopped them, not the tasks' failure: each task's
        ``max_attempts`` grows by one, so a rolling restart never fails a task. The next
        attempt still takes a new number, which fences this one's message and writes."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            return await _requeue_or_fail(
                conn,
                "state = 'running' AND (id, attempts) IN"
                " (SELECT * FROM unnest($1::uuid[], $2::int[]))",
                ([m.task_id for m in messages], [m.attempt for m in messages]),
                error,
                spent=False,
            )

    async def renew_leases(
        self, attempts: Mapping[UUID, int], worker_id: str, lease_s: float
    ) -> Renewal:
        """Extend the leases of this worker's running ``attempts`` (task id: attempt); say
        which of them were asked to cancel, which are no longer this worker's, and which
        it renewed.

        Rows another statement holds are skipped, not waited for: the claim and success
        writers lock many rows in an order of their plan's choosing, and a renewal
        waiting among them deadlocked (PostgreSQL then failed one of the two). A row
        skipped is being written (most likely finished) and is renewed next time. Lost
        is read from the statement's snapshot, without a lock: a row being written
        still reads as ours, one reaped (its lease ran out while the database was away)
        does not."""
        if not attempts:
            return Renewal([], [], [])
        rows = await self._fetch(
            """
            WITH mine AS (SELECT * FROM unnest($1::uuid[], $2::int[]) AS m(id, attempt)),
            renewed AS (
                UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $4)
                WHERE id IN (SELECT t.id FROM tasks t JOIN mine m ON m.id = t.id
                             WHERE t.attempts = m.attempt AND t.state = 'running'
                               AND t.worker_id = $3
                             FOR UPDATE OF t SKIP LOCKED)
                RETURNING id, cancel_requested_at
            )
            SELECT m.id, r.id IS NOT NULL AS renewed,
                   r.cancel_requested_at IS NOT NULL AS cancel,
                   NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = m.id
                               AND t.attempts = m.attempt AND t.state = 'running'
                               AND t.worker_id = $3) AS lost
            FROM mine m LEFT JOIN renewed r ON r.id = m.id
            """,
            list(attempts),
            list(attempts.values()),
            worker_id,
            lease_s,
        )
        return Renewal(
            cancel=[r["id"] for r in rows if r["cancel"]],
            lost=[r["id"] for r in rows if r["lost"]],
            renewed=[r["id"] for r in rows if r["renewed"]],
        )

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def reap(self, limit: int = 100) -> list[Row]:
        """Requeue (or fail, when out of attempts) running tasks whose lease ran out: their
        worker died, hung or lost the database. Fenced: the late worker's own updates
        name its attempt and state 'running', which no longer match."""
        error = {
            "type": "lost",
            "message": "the worker running this attempt stopped renewing its lease",
            "retryable": True,
        }
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            return await _requeue_or_fail(
                conn,
                "id IN (SELECT id FROM tasks WHERE state = 'running' AND lease_expires_at < now()"
                f" ORDER BY lease_expires_at LIMIT {int(limit)} FOR UPDATE SKIP LOCKED)",
                (),
                error,
            )

    async def purge_finished(self, older_than_s: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` tasks that finished more than ``older_than_s`` ago,
        oldest first; return how many. SKIP LOCKED: the workers share the work."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            status: str = await conn.execute(
                """
                DELETE FROM tasks WHERE id IN (
                    SELECT id FROM tasks
                    WHERE finished_at < now() - make_interval(secs => $1)
                      AND state IN ('succeeded', 'failed', 'cancelled')
                    ORDER BY finished_at LIMIT $2
                    FOR UPDATE SKIP LOCKED)
                """,
                older_than_s,
                limit,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def fire_schedules(self, plan: FirePlan, limit: int) -> list[Fire]:
        """Fire up to ``limit`` due schedules in one transaction: each one's task and its
        outbox row stored as the API stores a submission's, each schedule's next fire
        time and last fire written, as ``plan`` of the rows and the database's time
        says. Locked with SKIP LOCKED: workers firing at once share the due schedules,
        and each is fired by one of them. Returns the fires as carried out."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            due = await conn.fetch(_DUE_SCHEDULES, limit)
            if not due:
                return []
            types = await conn.fetch(
                f"SELECT {TYPE_COLUMNS} FROM task_types WHERE name = ANY($1::text[])",
                list({r["type"] for r in due}),
            )
            fires = plan(due, {t["name"]: t for t in types}, due[0]["now"])
            fires = await _store_fires(conn, fires)
            await conn.execute(
                _ADVANCE_SCHEDULES,
                [f.schedule_id for f in fires],
                [f.next_run_at for f in fires],
                [f.due_at for f in fires],
                [f.task.id if f.task is not None else None for f in fires],
                [f.error for f in fires],
            )
            if any(f.task is not None for f in fires):
                # Wakes every relay (other processes' too); delivered at commit.
                await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
            return fires

    async def event_row(self, task_id: UUID, tenant_id: UUID) -> Row | None:
        """The task's row as its latest event shows it, or None: no such task of this tenant."""
        return await self._fetchrow(
            f"SELECT {EVENT_COLUMNS} FROM tasks WHERE id = $1 AND tenant_id = $2",
            task_id,
            tenant_id,
        )

    async def dead_letter_task(
        self, message: TaskMessage, error: dict[str, Any], letter: Letter
    ) -> Row | None:
        """Keep a task's message the broker dead-lettered (a crash loop past the delivery
        limit) and fail the task if it waits for that attempt: it must still end, and be
        redrivable. In one transaction: with the dead letter committed alone, a failure
        before the task's update had the redelivery keep it a second time."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await letter.keep(conn, message.tenant_id, message.task_id)
            row: Row | None = await conn.fetchrow(
                f"""
                UPDATE tasks SET state = 'failed', error = $3, message = {_reason("$3")},
                    finished_at = now(),
                    next_attempt_at = NULL, last_seq = last_seq + 1, updated_at = now()
                WHERE id = $1 AND state IN ('queued', 'retrying') AND attempts = $2 - 1
                  AND tenant_id = $4  -- a forged message must not fail another's task
                RETURNING {EVENT_COLUMNS}
                """,
                message.task_id,
                message.attempt,
                error,
                message.tenant_id,
            )
            return row

    async def dead_letter(
        self, letter: Letter, tenant_id: UUID | None = None, task_id: UUID | None = None
    ) -> None:
        """Keep a message that can never be processed, with the reason, before acking it."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await letter.keep(conn, tenant_id, task_id)

    async def _fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            row: Row | None = await conn.fetchrow(sql, *args)
            return row

    async def _fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return list(await conn.fetch(sql, *args))

    async def _execute(self, sql: str, *args: Any) -> None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(sql, *args)


DEAD_LETTERS = Counter(
    "longhaul_dead_letters_total",
    "Messages kept in the dead_letters table, by reason (written in the transaction that"
    " failed the task, if any)",
    ["reason"],
)


def _kept(reason: str, status: str) -> None:
    """Count the dead letters an INSERT wrote: its status is "INSERT 0 <n>" (none where
    the same message was kept already, a redelivery)."""
    DEAD_LETTERS.labels(reason).inc(int(status.rsplit(" ", 1)[-1]))


# With the task's attempts and last error, when the message names a task of its tenant.
# Once per message of a task: the broker dead-letters at least once, and a worker may
# die between its commit and its ack (the body names the attempt, so a later attempt's
# letter, or one after a redrive, is kept).
_DEAD_LETTER = """
INSERT INTO dead_letters (id, tenant_id, task_id, reason, detail, body, headers,
                          attempts, last_error)
SELECT $1, t.id, task.id, $4, $5, $6, $7, task.attempts, task.error
FROM (SELECT 1) AS one
LEFT JOIN tenants t ON t.id = $2
-- Only the named tenant's task, its id included: a forged message may
-- name another's, which a redrive would then run.
LEFT JOIN tasks task ON task.id = $3 AND task.tenant_id = t.id
WHERE task.id IS NULL OR NOT EXISTS (
    SELECT 1 FROM dead_letters d
    WHERE d.task_id = task.id AND d.redriven_at IS NULL AND d.body = $6
)
"""


@dataclass(frozen=True)
class Letter:
    """A message to keep as a dead letter: why, and the message as it came."""

    reason: str
    detail: str
    body: bytes
    headers: Mapping[str, Any]

    async def keep(self, conn: Connection, tenant_id: UUID | None, task_id: UUID | None) -> None:
        """Write it to dead_letters (_DEAD_LETTER: with the task's attempts and error, once
        per message of a task), and count what was written."""
        status = await conn.execute(
            _DEAD_LETTER,
            uuid7(),
            tenant_id,
            task_id,
            self.reason,
            self.detail[:2000],
            self.body,
            dict(self.headers),
        )
        _kept(self.reason, status)


# A cancel has no error, and keeps the message.
_FINISH = f"""
UPDATE tasks SET state = $3, error = $4, message = coalesce({_reason("$4")}, message),
    finished_at = now(), worker_id = NULL,
    lease_expires_at = NULL, last_seq = last_seq + 1, updated_at = now()
WHERE id = $1 AND state = 'running' AND attempts = $2
RETURNING {EVENT_COLUMNS}
"""


# Due schedules, oldest fire time first. now() is the transaction's start: the time
# every fire of the transaction is planned from.
_DUE_SCHEDULES = f"""
SELECT {DUE_COLUMNS}, now() AS now FROM schedules
WHERE enabled AND next_run_at <= now()
ORDER BY next_run_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# Each fired schedule's next fire time, and its last fire: the task it made (its last
# error cleared), or why it made none (its last task kept).
_ADVANCE_SCHEDULES = """
UPDATE schedules AS s SET next_run_at = u.next_run_at,
    last_run_at = CASE WHEN u.task_id IS NULL THEN s.last_run_at ELSE u.due_at END,
    last_task_id = coalesce(u.task_id, s.last_task_id),
    last_error = u.error
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::uuid[], $5::text[])
    AS u(id, next_run_at, due_at, task_id, error)
WHERE s.id = u.id
"""

# Plans the fires of due schedules (services/worker/schedules.py, plan): the rows, the
# task_types rows of their types by name, and the database's time.
FirePlan = Callable[[Sequence[Row], Mapping[str, Row], datetime], list[Fire]]


async def _store_fires(conn: Connection, fires: list[Fire]) -> list[Fire]:
    """Store the tasks of ``fires`` (their outbox rows left to the relays' polls, which
    the caller's NOTIFY wakes); the fires as carried out. All in one statement; should
    that fail for some fire (its key taken: stored by an earlier fire of that time; or
    a value the database refuses), each alone, in a savepoint of its own, so that one
    bad schedule does not stop every other."""
    if all(f.task is None for f in fires):
        return fires
    try:
        async with conn.transaction():
            await _insert_fires(conn, fires)
    except asyncpg.PostgresError as exc:
        if isinstance(exc, TRANSIENT_ERRORS):
            raise
    else:
        return fires
    stored = []
    for fire in fires:
        beat()  # the schedule firing's: a statement each, each up to the timeout
        stored.append(await _store_alone(conn, fire) if fire.task is not None else fire)
    return stored


async def _store_alone(conn: Connection, fire: Fire) -> Fire:
    try:
        async with conn.transaction():
            await _insert_fires(conn, [fire])
    except asyncpg.PostgresError as exc:
        if isinstance(exc, TRANSIENT_ERRORS):
            raise
        if (
            isinstance(exc, asyncpg.UniqueViolationError)
            and exc.constraint_name == newtasks.IDEMPOTENCY_INDEX
        ):
            return fire.stored_before()
        return fire.refused(f"the database refused its task: {exc}")
    return fire


async def _insert_fires(conn: Connection, fires: Sequence[Fire]) -> None:
    """The tasks of ``fires`` (those that make one), each under its fire's key."""
    made = [(f, f.task) for f in fires if f.task is not None]
    tenant_ids = [f.tenant_id for f, _ in made]
    tasks = [t for _, t in made]
    await newtasks.insert(
        conn,
        tenant_ids,
        tasks,
        newtasks.bodies(tenant_ids, tasks),
        idempotency_keys=[f.key for f, _ in made],
    )


def _deadlock(exc: Exception) -> bool:
    return isinstance(exc, asyncpg.DeadlockDetectedError)


async def _requeue_or_fail(
    conn: Connection,
    where: str,
    args: tuple[Any, ...],
    error: dict[str, Any],
    *,
    spent: bool = True,
) -> list[Row]:
    """Move matching running tasks to ``queued`` with the next attempt in the outbox, or to
    ``failed`` when that was their last attempt, or to ``cancelled`` when their cancel
    was asked for (the attempt ended without its worker seeing it through). An attempt
    not ``spent`` raises ``max_attempts`` by one: it is never the last. Runs inside the
    caller's transaction."""
    n = len(args)
    # SET's expressions all read the row as it was: each compares with the new limit.
    limit = "max_attempts" if spent else "max_attempts + 1"
    rows = await conn.fetch(
        f"""
        UPDATE tasks SET
            state = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                         WHEN attempts >= {limit} THEN 'failed' ELSE 'queued' END,
            finished_at = CASE WHEN cancel_requested_at IS NOT NULL
                                 OR attempts >= {limit} THEN now() END,
            max_attempts = {limit},
            error = CASE WHEN cancel_requested_at IS NULL THEN ${n + 1}::jsonb END,
            message = CASE WHEN cancel_requested_at IS NULL THEN {_reason(f"${n + 1}")}
                           ELSE message END,
            worker_id = NULL, lease_expires_at = NULL,
            last_seq = last_seq + 1, updated_at = now()
        WHERE {where}
        RETURNING {EVENT_COLUMNS}, {outbox.MESSAGE_COLUMNS}
        """,
        *args,
        error,
    )
    await outbox.enqueue(conn, [outbox.next_attempt(r) for r in rows if r["state"] == "queued"])
    exhausted = [outbox.message_of(r, r["attempts"]) for r in rows if r["state"] == "failed"]
    _kept(deadletters.EXHAUSTED, await deadletters.keep_exhausted(conn, exhausted))
    return list(rows)
