"""The core pipeline with real processes: API → outbox → RabbitMQ → worker → PostgreSQL,
with progress events in Redis. One API and one worker serve every test of this module.

Poison messages are published straight to the queue, as a foreign or older producer
would, and must end in the dead_letters table with their reason."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, tzinfo
from typing import Any
from uuid import UUID

import aio_pika
import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from services.api.repository import ApiRepository, NewTask
from services.worker.deadletters import DeadLetterSink
from services.worker.progress import MAX_MESSAGE
from services.worker.registry import Registry
from services.worker.repository import Letter, WorkerRepository
from services.worker.runner import PASS_ON_DELAY_S, Runner
from services.worker.settings import WorkerSettings
from services.worker.threads import HandlerThreads
from shared.db import create_pool
from shared.failpoints import Failpoints
from shared.ids import uuid7
from shared.schemas import (
    ProgressEvent,
    TaskMessage,
    TaskRequest,
    encode_task_message,
    parse_event,
    parse_task_message,
)
from shared.taskrows import previous_events
from tests.conftest import ROOT_ENV, Deployment, Isolated, Tenant, create_tenant
from tests.support import (
    ServiceProcess,
    System,
    api_and_worker,
    eventually,
    outbox_emptied,
    run_cli,
    timeout,
    worker_metric,
)


@pytest.fixture(scope="module")
async def system(deployment: Deployment) -> AsyncIterator[System]:
    async with api_and_worker(deployment.env(retry_base_s="0.05", retry_cap_s="0.2")) as system:
        yield system


@pytest.fixture(scope="module")
def worker(system: System) -> ServiceProcess:
    return next(p for p in system.procs if p.name == "worker")


@pytest.fixture
async def amqp_channel(deployment: Deployment) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(deployment.amqp_url, timeout=10)
    channel = await connection.channel(publisher_confirms=True)
    yield channel
    await connection.close()


# ---------------------------------------------------------------- helpers


async def submit(
    http: aiohttp.ClientSession, system: System, tenant: Tenant, body: dict[str, Any]
) -> UUID:
    async with http.post(f"{system.api_url}/v1/tasks", json=body, headers=tenant.headers) as r:
        assert r.status == 202, await r.text()
        return UUID((await r.json())["id"])


def as_json(value: Any) -> Any:
    """A jsonb column, whether or not the pool decodes JSON."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


async def terminal_row(db: asyncpg.Pool, task_id: UUID, within: float = 30) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row = await db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
        return row if row and row["state"] in ("succeeded", "failed", "cancelled") else None

    return await eventually(check, within=within, what=f"task {task_id} to end")


async def events(redis: Redis, deployment: Deployment, task_id: UUID) -> list[ProgressEvent]:
    entries = await redis.xrange(deployment.wire.event_stream(task_id))
    out = []
    for entry_id, fields in entries:
        event = parse_event(fields[b"e"])
        assert entry_id == f"{event.seq}-0".encode()  # the entry id is the seq
        out.append(event)
    return out


async def gapless_events(
    redis: Redis, deployment: Deployment, db: asyncpg.Pool, task_id: UUID
) -> list[ProgressEvent]:
    """The task's events once the terminal one is in the stream; seq 1..N, no gap."""

    async def check() -> list[ProgressEvent] | None:
        found = await events(redis, deployment, task_id)
        return found if found and found[-1].state in ("succeeded", "failed", "cancelled") else None

    found = await eventually(check, within=15, what="the terminal event in the stream")
    last_seq = await db.fetchval("SELECT last_seq FROM tasks WHERE id = $1", task_id)
    assert [e.seq for e in found] == list(range(1, last_seq + 1)), [(e.seq, e.state) for e in found]
    assert all(e.task_id == task_id for e in found)
    return found


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    declared = await channel.declare_queue(name, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def queue_settled(
    system: System, http: aiohttp.ClientSession, channel: aio_pika.abc.AbstractChannel, queue: str
) -> bool:
    """Nothing ready in the queue and nothing being processed (so everything was acked)."""
    return (
        await queue_depth(channel, queue) == 0
        and await worker_metric(system, http, "longhaul_worker_in_flight") == 0
    )


# ---------------------------------------------------------------- happy paths


async def test_task_runs_and_stores_its_result(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
    deployment: Deployment,
) -> None:
    """A submitted demo.noop ends succeeded with its result, once, with gapless events."""
    task_id = await submit(http, system, tenant, {"type": "demo.noop"})
    row = await terminal_row(db, task_id)
    assert row["state"] == "succeeded"
    assert as_json(row["result"]) == {"ok": True}
    assert (row["attempts"], row["progress"], row["error"]) == (1, 1.0, None)
    assert row["finished_at"] is not None and row["worker_id"] is None
    found = await gapless_events(redis, deployment, db, task_id)
    assert [e.state for e in found] == ["queued", "running", "succeeded"]
    async with http.get(f"{system.api_url}/v1/tasks/{task_id}", headers=tenant.headers) as r:
        body = await r.json()
    assert (body["state"], body["result"], body["last_seq"]) == ("succeeded", {"ok": True}, 3)


async def test_the_worker_tells_its_loops_on_healthz_and_its_dependencies_on_readyz(
    system: System, http: aiohttp.ClientSession
) -> None:
    """/healthz names every essential loop by the seconds since its last turn (one that
    stops turning makes it 503: tests/unit/test_liveness.py); /readyz each dependency."""
    base = f"http://127.0.0.1:{system.metrics_port}"
    async with http.get(f"{base}/healthz") as r:
        assert r.status == 200
        health = await r.json()
    assert set(health["loops"]) == {
        "outbox-relay",
        "lease-heartbeat",
        "lease-watch",
        "reaper",
        "control-listener",
        "consumer-watchdog",
        "schedule-firing",
        "task-purge",
    }, health
    assert health["status"] == "ok" and "stale" not in health
    async with http.get(f"{base}/readyz") as r:
        assert r.status == 200
        assert (await r.json())["dependencies"] == {
            "postgresql": "ok",
            "redis": "ok",
            "rabbitmq": "ok",
        }


async def test_a_task_that_runs_on_is_shown_running_before_it_ends(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
    deployment: Deployment,
) -> None:
    """The start event is held back only briefly (LONGHAUL_START_EVENT_DELAY_S): a task
    that has not reported anything yet is already running in the stream."""
    task_id = await submit(
        http, system, tenant, {"type": "demo.sleep", "args": {"seconds": 6, "steps": 1}}
    )

    async def shown_running() -> bool:
        return [e.state for e in await events(redis, deployment, task_id)] == ["queued", "running"]

    # Its only report comes at the end: until then the stream can show it running. Six
    # seconds leave a busy machine time to submit, publish and claim it first.
    await eventually(shown_running, within=5, what="the running event before the first report")
    assert await db.fetchval("SELECT state FROM tasks WHERE id = $1", task_id) == "running"
    assert (await terminal_row(db, task_id))["state"] == "succeeded"


async def test_progress_events_are_ordered_and_gapless(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
    deployment: Deployment,
) -> None:
    """demo.sleep's progress reports reach Redis with seq 1..N and never decreasing."""
    task_id = await submit(
        http, system, tenant, {"type": "demo.sleep", "args": {"seconds": 0.5, "steps": 5}}
    )
    row = await terminal_row(db, task_id)
    assert row["state"] == "succeeded"
    found = await gapless_events(redis, deployment, db, task_id)
    assert found[-1].state == "succeeded" and found[-1].progress == 1.0
    running = [e for e in found if e.state == "running"]
    assert len(running) >= 3  # the claim and some progress reports
    progress = [e.progress for e in running]
    assert progress == sorted(progress)
    assert running[-1].message == "step 5 of 5"


async def test_permanent_error_fails_at_once(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
    deployment: Deployment,
) -> None:
    """A handler raising PermanentError ends failed after one attempt, retryable false."""
    task_id = await submit(
        http, system, tenant, {"type": "demo.fail", "args": {"message": "nope"}, "max_attempts": 5}
    )
    row = await terminal_row(db, task_id)
    assert row["state"] == "failed"
    assert row["attempts"] == 1
    assert as_json(row["error"]) == {
        "type": "demo_failure",
        "message": "nope",
        "retryable": False,
    }
    found = await gapless_events(redis, deployment, db, task_id)
    assert [e.state for e in found] == ["queued", "running", "failed"]
    await outbox_emptied(db, [task_id])


async def test_flaky_task_retries_then_succeeds(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
    deployment: Deployment,
) -> None:
    """demo.flaky with fail_times=2 succeeds on attempt 3, through retrying and queued."""
    task_id = await submit(http, system, tenant, {"type": "demo.flaky", "args": {"fail_times": 2}})
    row = await terminal_row(db, task_id)
    assert row["state"] == "succeeded", row["error"]
    assert row["attempts"] == 3
    assert as_json(row["result"]) == {"attempts": 3}
    assert row["error"] is None
    found = await gapless_events(redis, deployment, db, task_id)
    states = [e.state for e in found]
    assert states.count("retrying") == 2
    assert states[0] == "queued" and states[-1] == "succeeded"
    assert [e.attempt for e in found if e.state == "running"][-1] == 3


async def test_attempts_and_dead_letters_are_counted_for_operators(
    system: System, http: aiohttp.ClientSession, tenant: Tenant, db: asyncpg.Pool
) -> None:
    """What an operator alerts and scales on: attempts by type and outcome, their run
    time and the wait before each claim, dead letters by reason."""
    series = {
        "noop": 'longhaul_worker_attempts_total{outcome="succeeded",type="demo.noop"}',
        "fail": 'longhaul_worker_attempts_total{outcome="failed",type="demo.fail"}',
        "retry": 'longhaul_worker_attempts_total{outcome="retrying",type="demo.flaky"}',
        "exhaust": 'longhaul_worker_attempts_total{outcome="exhausted",type="demo.flaky"}',
        "letters": 'longhaul_dead_letters_total{reason="attempts_exhausted"}',
        "waits": 'longhaul_worker_queue_wait_seconds_count{type="demo.flaky"}',
        "runs": 'longhaul_worker_attempt_seconds_count{type="demo.flaky"}',
    }

    async def counts() -> dict[str, float]:
        return {k: await worker_metric(system, http, v, missing=0) for k, v in series.items()}

    before = await counts()
    ids = [
        await submit(http, system, tenant, {"type": "demo.noop"}),
        await submit(http, system, tenant, {"type": "demo.fail", "args": {"message": "x"}}),
        await submit(
            http,
            system,
            tenant,
            {"type": "demo.flaky", "args": {"fail_times": 5}, "max_attempts": 2},
        ),
    ]
    for task_id in ids:
        await terminal_row(db, task_id)
    after = await counts()
    assert {k: after[k] - before[k] for k in series} == {
        "noop": 1,
        "fail": 1,
        "retry": 1,
        "exhaust": 1,
        "letters": 1,
        "waits": 2,  # one per attempt of the flaky task
        "runs": 2,
    }


async def test_events_stay_gapless_when_the_relay_promotes_a_retry_first(
    isolated: Isolated, redis: Redis
) -> None:
    """A retry due at once is promoted by the API's relay while the worker, having
    committed the failed attempt, still holds that attempt's events (a pause after the
    commit makes sure). Redis refuses a seq below the stream's last, so the worker must
    have written the held ones before committing. Its own database and queue: this
    module's worker must not take the retry."""
    dep, db, tenant = isolated.deployment, isolated.db, isolated.tenant
    env = dep.env(retry_base_s="0", failpoints="worker.after_commit=pause")
    async with api_and_worker(env) as paused, aiohttp.ClientSession() as http:
        task_id = await submit(
            http, paused, tenant, {"type": "demo.flaky", "args": {"fail_times": 1}}
        )
        assert (await terminal_row(db, task_id))["state"] == "succeeded"
        found = await gapless_events(redis, dep, db, task_id)
    assert [e.state for e in found][:4] == ["queued", "running", "retrying", "queued"]


async def test_a_failure_tells_its_subscribers_why(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
    deployment: Deployment,
) -> None:
    """A live subscriber learns why from the event itself: a handler raising (the
    message bounded as a progress message's), a retry, a timeout; and a replay of the
    stream afterwards, or the row a snapshot is made of, says the same."""
    pubsub = redis.pubsub()
    await pubsub.psubscribe(deployment.wire.event_channel("") + "*")
    assert await pubsub.get_message(timeout=timeout(5)) is not None  # the subscribe reply
    long = "why: " + "x" * 2995
    failing = await submit(http, system, tenant, {"type": "demo.fail", "args": {"message": long}})
    flaky = await submit(http, system, tenant, {"type": "demo.flaky", "args": {"fail_times": 1}})
    slow = await submit(
        http,
        system,
        tenant,
        {"type": "demo.sleep", "args": {"seconds": 60}, "timeout_s": 0.2, "max_attempts": 1},
    )
    live: dict[UUID, list[ProgressEvent]] = {failing: [], flaky: [], slow: []}

    async def all_ended() -> bool:
        while msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1):
            event = parse_event(msg["data"])
            live.get(event.task_id, []).append(event)
        return all(found and found[-1].state.terminal for found in live.values())

    try:
        await eventually(all_ended, within=30, what="the three tasks' terminal events")
    finally:
        await pubsub.aclose()
    why = {
        failing: long[:MAX_MESSAGE],
        flaky: "attempt 1 of 1 planned failures",
        slow: "the attempt ran past its timeout of 0.2s",
    }
    assert live[failing][-1].state == "failed" and live[failing][-1].message == why[failing]
    assert live[slow][-1].state == "failed" and live[slow][-1].message == why[slow]
    [retrying] = [e for e in live[flaky] if e.state == "retrying"]
    assert retrying.message == why[flaky]
    assert live[flaky][-1].state == "succeeded"
    for task_id in (failing, slow):
        replayed = await gapless_events(redis, deployment, db, task_id)
        assert replayed[-1] == live[task_id][-1]
        row = await db.fetchrow("SELECT message, error FROM tasks WHERE id = $1", task_id)
        assert row["message"] == why[task_id]
        assert as_json(row["error"])["message"].startswith(why[task_id])
    replayed = await gapless_events(redis, deployment, db, flaky)
    assert [e.message for e in replayed if e.state == "retrying"] == [why[flaky]]


async def test_a_claim_backfills_a_retry_with_its_reason(isolated: Isolated) -> None:
    """The retrying event a claim rebuilds from the row's old values (for a stream that
    missed it) carries the retry's reason, as the event first written did."""
    repo = WorkerRepository(isolated.db, timeout=10)
    task_id = await _insert_running(isolated.db, isolated.tenant.id, 1, 30)
    message = TaskMessage(
        task_id=task_id, tenant_id=isolated.tenant.id, type="demo.noop", attempt=1
    )
    error = {"type": "flaky", "message": "try again", "retryable": True}
    retried = await repo.retry_later(message, error, 0)
    assert retried is not None and retried["message"] == "try again"
    claimed = await repo.claim(message.model_copy(update={"attempt": 2}), "w-test", 30)
    await repo.aclose()
    assert claimed is not None and claimed.row["message"] is None
    [previous] = previous_events([claimed.row])
    assert (previous.state, previous.message) == ("retrying", "try again")


async def test_flaky_task_out_of_attempts_fails(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
) -> None:
    """A retryable error on the last attempt fails the task, retryable true."""
    task_id = await submit(
        http,
        system,
        tenant,
        {"type": "demo.flaky", "args": {"fail_times": 5}, "max_attempts": 2},
    )
    row = await terminal_row(db, task_id)
    assert (row["state"], row["attempts"]) == ("failed", 2)
    error = as_json(row["error"])
    assert error["type"] == "flaky" and error["retryable"] is True
    # Its attempts ran out: a dead letter too (committed with the failure), listed and
    # redriven like the poison messages.
    [letter] = await db.fetch("SELECT * FROM dead_letters WHERE task_id = $1", task_id)
    assert (letter["reason"], letter["tenant_id"], letter["attempts"]) == (
        "attempts_exhausted",
        tenant.id,
        2,
    )
    assert as_json(letter["last_error"]) == error
    assert "2 of 2 attempts failed" in letter["detail"]
    kept = parse_task_message(bytes(letter["body"]))
    assert (kept.task_id, kept.tenant_id, kept.attempt) == (task_id, tenant.id, 2)
    redrive = f"{system.api_url}/v1/dead-letters/{letter['id']}/redrive"
    async with http.post(redrive, headers=tenant.headers) as r:
        assert r.status == 202, await r.text()

    async def failed_again() -> asyncpg.Record | None:
        row = await db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
        return row if row["state"] == "failed" and row["attempts"] == 3 else None

    await eventually(failed_again, within=30, what="the redriven attempt to fail again")
    letters = await db.fetch(
        "SELECT attempts, redriven_at FROM dead_letters WHERE task_id = $1 ORDER BY id", task_id
    )
    assert [(r["attempts"], r["redriven_at"] is None) for r in letters] == [(2, False), (3, True)]


# ---------------------------------------------------------------- duplicates and poison


async def publish_raw(
    channel: aio_pika.abc.AbstractChannel, deployment: Deployment, body: bytes
) -> None:
    exchange = await channel.get_exchange(deployment.wire.tasks_exchange)
    await exchange.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        deployment.wire.tasks_routing_key,
        mandatory=True,
    )


async def test_duplicate_delivery_of_a_terminal_task_is_acked_and_skipped(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    deployment: Deployment,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """The same message published twice more after the task succeeded changes nothing
    and leaves no message behind."""
    task_id = await submit(http, system, tenant, {"type": "demo.noop"})
    before = await terminal_row(db, task_id)
    delivered = await worker_metric(system, http, "longhaul_worker_deliveries_total")
    message = TaskMessage(task_id=task_id, tenant_id=tenant.id, type="demo.noop", attempt=1)
    for _ in range(2):
        await publish_raw(amqp_channel, deployment, message.model_dump_json().encode())

    async def both_delivered() -> bool:
        now = await worker_metric(system, http, "longhaul_worker_deliveries_total")
        return now >= delivered + 2

    await eventually(both_delivered, within=15, what="the two duplicates to be delivered")
    await eventually(
        lambda: queue_settled(system, http, amqp_channel, deployment.wire.tasks_queue),
        within=15,
        what="the queue to be empty and nothing in flight",
    )
    after = await db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    assert dict(after) == dict(before)


async def test_poison_messages_are_dead_lettered_with_their_reason(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
    deployment: Deployment,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """Malformed, v2 and unknown-type messages end in dead_letters with their reason,
    the unknown-type task ends failed, and the queue is left empty."""
    marker = uuid7().hex
    malformed = f"not json {marker}".encode()
    v2 = orjson.dumps(
        {
            "v": 2,
            "task_id": str(uuid7()),
            "tenant_id": str(tenant.id),
            "type": "demo.noop",
            "attempt": 1,
            "marker": marker,
        }
    )
    # A real task of a type no worker runs (inserted on the API's own path, which the
    # API only refuses because of its registry).
    pool = await create_pool(deployment.database_url, max_size=2)
    try:
        unknown_id = uuid7()
        await ApiRepository(pool, timeout=10).insert(
            tenant.id, [NewTask(id=unknown_id, request=TaskRequest(type="nobody.runs.this"))]
        )
    finally:
        await pool.close()
    for body in (malformed, v2):
        await publish_raw(amqp_channel, deployment, body)

    async def dead() -> list[asyncpg.Record] | None:
        rows = await db.fetch(
            "SELECT * FROM dead_letters WHERE body = ANY($1::bytea[]) OR task_id = $2",
            [malformed, v2],
            unknown_id,
        )
        return rows if len(rows) >= 3 else None

    rows = await eventually(dead, within=20, what="three dead letters")
    by_reason = {r["reason"]: r for r in rows}
    assert sorted(by_reason) == ["malformed", "unknown_type", "unknown_version"]
    assert len(rows) == 3  # each once
    assert bytes(by_reason["malformed"]["body"]) == malformed
    assert bytes(by_reason["unknown_version"]["body"]) == v2
    assert "2" in by_reason["unknown_version"]["detail"]
    unknown = by_reason["unknown_type"]
    assert unknown["tenant_id"] == tenant.id and unknown["task_id"] == unknown_id
    assert "nobody.runs.this" in unknown["detail"]
    task = await terminal_row(db, unknown_id)
    assert task["state"] == "failed"
    assert as_json(task["error"])["type"] == "unknown_type"
    found = await gapless_events(redis, deployment, db, unknown_id)
    assert [e.state for e in found] == ["queued", "running", "failed"]
    assert found[-1].message == unknown["detail"]
    assert as_json(task["error"])["retryable"] is False
    await eventually(
        lambda: queue_settled(system, http, amqp_channel, deployment.wire.tasks_queue),
        within=15,
        what="the queue to be empty and nothing in flight",
    )
    assert system.procs[-1].alive()


async def test_duplicates_in_one_claim_batch_claim_the_task_once(
    db: asyncpg.Pool, tenant: Tenant
) -> None:
    """Claims of concurrent deliveries share a statement; two copies of one message in
    the same batch must still give the attempt to exactly one of them."""
    repo = WorkerRepository(db, timeout=10)
    task_ids = [uuid7() for _ in range(6)]
    await db.executemany(
        "INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts, timeout_s,"
        " last_seq) VALUES ($1, $2, 'demo.noop', '{}'::jsonb, 'queued', 3, 60, 1)",
        [(t, tenant.id) for t in task_ids],
    )
    messages = [
        TaskMessage(task_id=t, tenant_id=tenant.id, type="demo.noop", attempt=1) for t in task_ids
    ]
    # Each message twice, all submitted in the same tick: one group commit batch.
    claims = await asyncio.gather(*(repo.claim(m, "w-test", 30) for m in messages + messages))
    await repo.aclose()
    won = [c.message.task_id for c in claims if c is not None]
    assert sorted(won) == sorted(task_ids)
    rows = await db.fetch(
        "SELECT state, attempts, last_seq FROM tasks WHERE id = ANY($1)", task_ids
    )
    assert {(r["state"], r["attempts"], r["last_seq"]) for r in rows} == {("running", 1, 2)}


async def test_a_claim_rebuilds_the_previous_event_only_from_the_version_before(
    db: asyncpg.Pool, tenant: Tenant
) -> None:
    """The claim reads the row's old values without a lock. Alone, they are the queued
    event it backfills; when another writer changes the row while the claim waits for it,
    they are stale, and no previous event is rebuilt from them."""
    repo = WorkerRepository(db, timeout=10)
    calm, raced = uuid7(), uuid7()
    await db.executemany(
        "INSERT INTO tasks (id, tenant_id, type, args, state, max_attempts, timeout_s,"
        " last_seq) VALUES ($1, $2, 'demo.noop', '{}'::jsonb, 'queued', 3, 60, 1)",
        [(calm, tenant.id), (raced, tenant.id)],
    )

    def message(task_id: UUID) -> TaskMessage:
        return TaskMessage(task_id=task_id, tenant_id=tenant.id, type="demo.noop", attempt=1)

    claimed = await repo.claim(message(calm), "w-test", 30)
    assert claimed is not None
    [previous] = previous_events([claimed.row])
    assert (previous.seq, previous.state, claimed.row["last_seq"]) == (1, "queued", 2)

    async with db.acquire() as other, other.transaction():
        # Another writer holds the row (a new version, still queued) while the claim runs.
        await other.execute("UPDATE tasks SET last_seq = 2 WHERE id = $1", raced)
        claim = asyncio.create_task(repo.claim(message(raced), "w-test", 30))

        async def waiting() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database() AND query LIKE '%WITH req AS%'"
                )
            )

        await eventually(waiting, within=10, what="the claim to wait for the row")
    claimed = await asyncio.wait_for(claim, 10)
    await repo.aclose()
    assert claimed is not None
    assert (claimed.row["prev_last_seq"], claimed.row["last_seq"]) == (1, 3)
    assert previous_events([claimed.row]) == []


async def test_a_message_naming_another_tenants_task_leaves_no_task_to_redrive(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    deployment: Deployment,
    amqp_channel: aio_pika.abc.AbstractChannel,
) -> None:
    """A forged message (a real task id, a tenant that is not the task's) is kept as an
    ``unknown_task`` dead letter that names no task: redriving it runs nothing."""
    victim = await submit(http, system, tenant, {"type": "demo.fail", "args": {"message": "x"}})
    assert (await terminal_row(db, victim))["state"] == "failed"
    forged = TaskMessage(task_id=victim, tenant_id=uuid7(), type="demo.noop", attempt=1)
    body = encode_task_message(forged)
    await publish_raw(amqp_channel, deployment, body)

    async def kept() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT * FROM dead_letters WHERE body = $1", body
        )
        return row

    letter = await eventually(kept, within=20, what="the forged message's dead letter")
    assert (letter["reason"], letter["tenant_id"], letter["task_id"]) == (
        "unknown_task",
        None,
        None,
    )
    code, _, err = await run_cli(
        {**ROOT_ENV, **deployment.env()}, "dlq", "redrive", str(letter["id"])
    )
    assert code != 0 and "no task to run again" in err, err
    row = await db.fetchrow("SELECT state, attempts FROM tasks WHERE id = $1", victim)
    assert (row["state"], row["attempts"]) == ("failed", 1)


async def test_a_lost_last_attempt_fails_the_task_and_keeps_a_dead_letter(
    isolated: Isolated,
) -> None:
    """The reaper fails a task whose last attempt's lease ran out and keeps that
    attempt's message as a dead letter, in one transaction. A database of its own: no
    other reaper gets there first."""
    repo = WorkerRepository(isolated.db, timeout=10)
    task_id = uuid7()
    await isolated.db.execute(
        "INSERT INTO tasks (id, tenant_id, type, args, state, attempts, max_attempts,"
        " timeout_s, last_seq, started_at, worker_id, lease_expires_at)"
        " VALUES ($1, $2, 'demo.noop', '{}'::jsonb, 'running', 2, 2, 60, 4, now(), 'gone',"
        " now() - interval '1 second')",
        task_id,
        isolated.tenant.id,
    )
    [row] = await repo.reap()
    assert (row["id"], row["state"]) == (task_id, "failed")
    lost = "the worker running this attempt stopped renewing its lease"
    assert row["message"] == lost
    [letter] = await isolated.db.fetch("SELECT * FROM dead_letters WHERE task_id = $1", task_id)
    assert (letter["reason"], letter["tenant_id"], letter["attempts"]) == (
        "attempts_exhausted",
        isolated.tenant.id,
        2,
    )
    assert as_json(letter["last_error"])["type"] == "lost"
    kept = parse_task_message(bytes(letter["body"]))
    assert (kept.task_id, kept.type, kept.attempt) == (task_id, "demo.noop", 2)
    # Not its last attempt: requeued, and no dead letter.
    again = uuid7()
    await isolated.db.execute(
        "INSERT INTO tasks (id, tenant_id, type, args, state, attempts, max_attempts,"
        " timeout_s, last_seq, started_at, worker_id, lease_expires_at)"
        " VALUES ($1, $2, 'demo.noop', '{}'::jsonb, 'running', 1, 2, 60, 2, now(), 'gone',"
        " now() - interval '1 second')",
        again,
        isolated.tenant.id,
    )
    [row] = await repo.reap()
    assert (row["id"], row["state"], row["message"]) == (again, "queued", lost)
    assert (
        await isolated.db.fetchval("SELECT count(*) FROM dead_letters WHERE task_id = $1", again)
        == 0
    )


async def _insert_running(db: asyncpg.Pool, tenant_id: UUID, attempts: int, lease_s: float) -> UUID:
    """A running task of a worker that is gone, its lease ending ``lease_s`` from now."""
    task_id = uuid7()
    await db.execute(
        "INSERT INTO tasks (id, tenant_id, type, args, state, attempts, max_attempts,"
        " timeout_s, last_seq, started_at, worker_id, lease_expires_at)"
        " VALUES ($1, $2, 'demo.noop', '{}'::jsonb, 'running', $3, 2, 60, 2, now(), 'gone',"
        " now() + make_interval(secs => $4))",
        task_id,
        tenant_id,
        attempts,
        lease_s,
    )
    return task_id


@pytest.mark.parametrize("attempts", [1, 2])
async def test_a_lost_attempt_whose_cancel_was_asked_ends_cancelled(
    isolated: Isolated, attempts: int
) -> None:
    """The user asked to cancel; the worker died before it saw the request. The
    reaper ends the task cancelled: no next attempt, no failure, no dead letter."""
    task_id = await _insert_running(isolated.db, isolated.tenant.id, attempts, -1)
    await isolated.db.execute("UPDATE tasks SET cancel_requested_at = now() WHERE id = $1", task_id)
    [row] = await WorkerRepository(isolated.db, timeout=10).reap()
    assert (row["id"], row["state"]) == (task_id, "cancelled")
    task = await isolated.db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    assert task["error"] is None and task["finished_at"] is not None
    for table in ("outbox", "dead_letters"):
        count = f"SELECT count(*) FROM {table} WHERE task_id = $1"
        assert await isolated.db.fetchval(count, task_id) == 0, table


async def test_a_retryable_failure_after_a_cancel_was_asked_ends_cancelled(
    isolated: Isolated,
) -> None:
    """The user asked to cancel; the worker had not seen it (its control message
    missed) when the handler failed with a retryable error. The task ends cancelled
    at once: no retry after the backoff, nothing in the outbox."""
    task_id = await _insert_running(isolated.db, isolated.tenant.id, 1, 3600)
    await isolated.db.execute("UPDATE tasks SET cancel_requested_at = now() WHERE id = $1", task_id)
    message = TaskMessage(
        task_id=task_id, tenant_id=isolated.tenant.id, type="demo.noop", attempt=1
    )
    error = {"type": "flaky", "message": "try again", "retryable": True}
    repo = WorkerRepository(isolated.db, timeout=10)
    row = await repo.retry_later(message, error, delay_s=600)
    assert row is not None and row["state"] == "cancelled"
    task = await isolated.db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    assert task["state"] == "cancelled" and task["error"] is None
    assert task["finished_at"] is not None and task["next_attempt_at"] is None
    assert (
        await isolated.db.fetchval("SELECT count(*) FROM outbox WHERE task_id = $1", task_id) == 0
    )
    # Without a cancel asked, the same failure schedules the next attempt.
    again = await _insert_running(isolated.db, isolated.tenant.id, 1, 3600)
    row = await repo.retry_later(message.model_copy(update={"task_id": again}), error, 600)
    assert row is not None and row["state"] == "retrying"
    assert await isolated.db.fetchval("SELECT count(*) FROM outbox WHERE task_id = $1", again) == 1


async def test_a_cancel_waiting_for_a_workers_commit_cancels_the_task(
    system: System, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """A cancel that arrives while a worker's transaction moves the task from running
    to retrying waits for it and cancels the retrying task (it answered 409 'already
    retrying': the task matched neither of the cancel's two updates)."""
    tenant = await create_tenant(db)
    task_id = await _insert_running(db, tenant.id, 1, 3600)
    url = f"{system.api_url}/v1/tasks/{task_id}/cancel"
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE tasks SET state = 'retrying', worker_id = NULL, lease_expires_at = NULL,"
            " next_attempt_at = now() + interval '1 hour' WHERE id = $1",
            task_id,
        )
        cancel = asyncio.create_task(http.post(url, headers=tenant.headers))
        await asyncio.sleep(0.5)  # the cancel is waiting for this row
        assert not cancel.done()
    async with await cancel as r:
        body = await r.json()
        assert r.status == 202, body
    assert body["state"] == "cancelled"


async def test_the_success_writer_and_the_lease_renewal_never_deadlock(
    isolated: Isolated,
) -> None:
    """Both write the rows of the worker's running tasks at once; they locked them in
    different orders and deadlocked, the renewal (the heartbeat) often the victim. The
    renewal now skips the rows another statement holds."""
    db = isolated.db
    repo = WorkerRepository(db, timeout=10, concurrency=16)
    ids = [
        await _insert_running(db, isolated.tenant.id, 1, 30) for _ in range(16)
    ]  # created in id order; the successes come in the reverse one
    deadlocks = 0
    for _ in range(200):
        await db.execute(
            "UPDATE tasks SET state = 'running', attempts = 1, worker_id = 'w'"
            " WHERE id = ANY($1::uuid[])",
            ids,
        )
        results = await asyncio.gather(
            repo._succeed_rows([(i, 1, {"ok": True}) for i in reversed(ids)]),
            repo.renew_leases(dict.fromkeys(ids, 1), "w", 30),
            return_exceptions=True,
        )
        deadlocks += sum(isinstance(r, asyncpg.DeadlockDetectedError) for r in results)
        assert not [r for r in results if isinstance(r, BaseException)], results
    assert deadlocks == 0


async def test_a_renewal_tells_the_attempts_no_longer_ours_from_those_being_written(
    isolated: Isolated,
) -> None:
    """After an outage longer than a lease, another worker's reaper may have requeued
    an attempt that still runs here: the renewal says it is lost, so the heartbeat
    stops it. A row another statement is writing (locked) is not renewed this time,
    and not lost either; a cancel asked for is told; the renewed ones are named."""
    db, repo = isolated.db, WorkerRepository(isolated.db, timeout=10)
    kept, reaped, busy, cancelled = [
        await _insert_running(db, isolated.tenant.id, 1, 30) for _ in range(4)
    ]
    await db.execute(
        "UPDATE tasks SET worker_id = 'w' WHERE id = ANY($1::uuid[])",
        [kept, reaped, busy, cancelled],
    )
    await db.execute("UPDATE tasks SET cancel_requested_at = now() WHERE id = $1", cancelled)
    await db.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 s' WHERE id = $1", reaped
    )
    assert [r["id"] for r in await repo.reap()] == [reaped]
    before = await db.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", busy)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", busy)
        renewal = await repo.renew_leases(
            dict.fromkeys([kept, reaped, busy, cancelled], 1), "w", 60
        )
    assert renewal.lost == [reaped] and renewal.cancel == [cancelled]
    # Only these leases were extended: the heartbeat counts them as known good.
    assert sorted(renewal.renewed) == sorted([kept, cancelled])
    assert await db.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", busy) == before
    # Another attempt of ours is not this one: lost too.
    assert (await repo.renew_leases({kept: 2}, "w", 60)).lost == [kept]


async def test_a_broker_dead_letter_fails_only_its_own_tenants_task(isolated: Isolated) -> None:
    """A crash-looping message the broker dead-letters fails the task it names, but a
    forged one naming another tenant's task leaves that task alone."""
    repo = WorkerRepository(isolated.db, timeout=10)
    other = await create_tenant(isolated.db)
    task_id = await _insert_running(isolated.db, isolated.tenant.id, 0, 30)
    await isolated.db.execute("UPDATE tasks SET state = 'queued' WHERE id = $1", task_id)
    error = {"type": "poison", "message": "crash loop", "retryable": False}
    forged = TaskMessage(task_id=task_id, tenant_id=other.id, type="demo.noop", attempt=1)
    letter = Letter("delivery_limit", "crash loop", encode_task_message(forged), {})
    assert await repo.dead_letter_task(forged, error, letter) is None
    assert await isolated.db.fetchval("SELECT state FROM tasks WHERE id = $1", task_id) == "queued"
    own = forged.model_copy(update={"tenant_id": isolated.tenant.id})
    own_letter = Letter("delivery_limit", "crash loop", encode_task_message(own), {})
    row = await repo.dead_letter_task(own, error, own_letter)
    assert row is not None and (row["state"], row["message"]) == ("failed", "crash loop")


async def test_a_message_dead_lettered_twice_is_kept_once(isolated: Isolated) -> None:
    """The broker dead-letters at least once, and a worker may die between its commit and
    its ack: the same message again adds no second letter (a redrive of the stale one
    would run the task again); another attempt's message is kept."""
    repo = WorkerRepository(isolated.db, timeout=10)
    task_id = await _insert_running(isolated.db, isolated.tenant.id, 0, 30)
    await isolated.db.execute("UPDATE tasks SET state = 'queued' WHERE id = $1", task_id)
    error = {"type": "poison", "message": "crash loop", "retryable": False}
    message = TaskMessage(
        task_id=task_id, tenant_id=isolated.tenant.id, type="demo.noop", attempt=1
    )
    letter = Letter("delivery_limit", "crash loop", encode_task_message(message), {})
    assert await repo.dead_letter_task(message, error, letter) is not None
    assert await repo.dead_letter_task(message, error, letter) is None
    unknown = Letter("unknown_type", "no worker", encode_task_message(message), {})
    assert await repo.fail_and_keep(message, error, unknown) is None  # already failed
    later = message.model_copy(update={"attempt": 2})
    kept = Letter("malformed", "x", encode_task_message(later), {})
    await repo.dead_letter(kept, tenant_id=later.tenant_id, task_id=later.task_id)
    count = "SELECT count(*) FROM dead_letters WHERE task_id = $1"
    assert await isolated.db.fetchval(count, task_id) == 2


class _DeadLetter:
    """A delivery from the dead-letter queue; an error in process() would requeue it."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers = {"x-first-death-reason": "delivery_limit"}

    @contextlib.asynccontextmanager
    async def process(self, *, requeue: bool) -> AsyncIterator[None]:
        yield


class _Events:
    def __init__(self) -> None:
        self.emitted: list[ProgressEvent] = []

    async def emit(self, events: list[ProgressEvent], *, backfill: Any = ()) -> bool:
        self.emitted += events
        return True

    async def announce(self, event: ProgressEvent) -> bool:
        return True


async def _no_pause(_: float) -> None:
    pass


async def test_a_dead_letter_redelivered_after_a_failure_is_kept_once(
    isolated: Isolated,
) -> None:
    """The task's update fails after the dead letter's insert: the delivery goes back
    to the queue, and its redelivery leaves one dead letter, not two."""
    task_id = await _insert_running(isolated.db, isolated.tenant.id, 0, 30)
    await isolated.db.execute("UPDATE tasks SET state = 'queued' WHERE id = $1", task_id)
    message = TaskMessage(
        task_id=task_id, tenant_id=isolated.tenant.id, type="demo.noop", attempt=1
    )
    events = _Events()
    repo = WorkerRepository(isolated.db, timeout=10)
    sink = DeadLetterSink(None, repo, events, pause=_no_pause)  # type: ignore[arg-type]
    delivery = _DeadLetter(encode_task_message(message))
    await isolated.db.execute(
        """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$;
        CREATE TRIGGER refuse BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION refuse();
        """
    )
    with pytest.raises(asyncpg.RaiseError, match="refused"):
        await sink._on_message(delivery)  # type: ignore[arg-type]
    await isolated.db.execute("DROP TRIGGER refuse ON tasks")
    await sink._on_message(delivery)  # type: ignore[arg-type]
    count = "SELECT count(*) FROM dead_letters WHERE task_id = $1"
    assert await isolated.db.fetchval(count, task_id) == 1
    assert await isolated.db.fetchval("SELECT state FROM tasks WHERE id = $1", task_id) == "failed"
    assert [(e.task_id, e.state) for e in events.emitted] == [(task_id, "failed")]


async def test_a_task_of_a_type_no_worker_runs_is_never_failed_without_its_dead_letter(
    isolated: Isolated,
) -> None:
    """The dead letter's insert fails after the task's update: neither is kept (a task
    failed as unknown_type with no dead letter could not be redriven), and the task ends
    with its dead letter once its lease runs out and its next attempt comes."""
    task_id = await _insert_running(isolated.db, isolated.tenant.id, 0, 30)
    await isolated.db.execute("UPDATE tasks SET state = 'queued' WHERE id = $1", task_id)
    message = TaskMessage(
        task_id=task_id, tenant_id=isolated.tenant.id, type="demo.noop", attempt=1
    )
    repo = WorkerRepository(isolated.db, timeout=10)
    runner = Runner(
        WorkerSettings(),
        repo,
        _Events(),  # type: ignore[arg-type]
        Registry([]),
        Failpoints(""),
        "w",
        HandlerThreads(1),
    )
    await isolated.db.execute(
        """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON dead_letters
            FOR EACH ROW EXECUTE FUNCTION refuse();
        """
    )
    with pytest.raises(asyncpg.RaiseError, match="refused"):
        await runner.process(encode_task_message(message), {})
    await isolated.db.execute("DROP TRIGGER refuse ON dead_letters")
    await runner.process(encode_task_message(message), {})  # the redelivery: a duplicate
    letters = "SELECT reason FROM dead_letters WHERE task_id = $1"
    state = "SELECT state FROM tasks WHERE id = $1"
    assert await isolated.db.fetchval(state, task_id) == "running"
    assert await isolated.db.fetch(letters, task_id) == []
    await isolated.db.execute("UPDATE tasks SET lease_expires_at = now() WHERE id = $1", task_id)
    [row] = await repo.reap()
    assert row["state"] == "queued"
    second = message.model_copy(update={"attempt": 2})
    await runner.process(encode_task_message(second), {})
    await repo.aclose()
    assert await isolated.db.fetchval(state, task_id) == "failed"
    assert [r["reason"] for r in await isolated.db.fetch(letters, task_id)] == ["unknown_type"]


async def test_a_passed_on_message_is_due_by_the_databases_clock(
    isolated: Isolated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker lacking a task's type passes its message on PASS_ON_DELAY_S later by
    PostgreSQL's clock: this worker's, an hour ahead, must not hold it back an hour."""

    class Ahead(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> Ahead:
            return cls.fromtimestamp(datetime.now(tz).timestamp() + 3600, tz)

    monkeypatch.setattr("services.worker.repository.datetime", Ahead, raising=False)
    task_id = await _insert_running(isolated.db, isolated.tenant.id, 0, 30)
    await isolated.db.execute("UPDATE tasks SET state = 'queued' WHERE id = $1", task_id)
    await isolated.db.execute(
        "INSERT INTO task_types (name, args_schema, seen_at) VALUES ('demo.noop', '{}', now())"
    )
    message = TaskMessage(
        task_id=task_id, tenant_id=isolated.tenant.id, type="demo.noop", attempt=1
    )
    repo = WorkerRepository(isolated.db, timeout=10)
    before = await isolated.db.fetchval("SELECT now()")
    assert await repo.pass_on(message, seen_within_s=30, delay_s=PASS_ON_DELAY_S)
    due = await isolated.db.fetchval("SELECT available_at FROM outbox WHERE task_id = $1", task_id)
    # Not before the delay by the database's clock, and not an hour after it.
    assert PASS_ON_DELAY_S <= (due - before).total_seconds() < PASS_ON_DELAY_S + 60
