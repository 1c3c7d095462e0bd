"""The gateway against the real Redis and PostgreSQL, served in-process on port 0:
replay, live relay, snapshots, auth and the slow-consumer rule."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.ws_gateway.app import Gateway
from services.ws_gateway.settings import GatewaySettings
from shared import keys, wstokens
from shared.events import EventSink
from shared.ids import uuid7
from shared.schemas import ProgressEvent, TaskState, format_ts
from tests.conftest import Deployment, Tenant, add_key, create_tenant
from tests.support import eventually, timeout, until

# ---------------------------------------------------------------- helpers


def gateway_settings(deployment: Deployment, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "namespace": deployment.namespace,
        "database_url": deployment.database_url,
        "redis_url": deployment.redis_url,
        "gateway_port": 0,
        "start_timeout_s": 10,
        "snapshot_grace_s": 0.05,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@contextlib.asynccontextmanager
async def gateway(deployment: Deployment, **overrides: Any) -> AsyncIterator[Gateway]:
    gw = Gateway(gateway_settings(deployment, **overrides))
    async with gw.start():
        yield gw


@pytest.fixture
def sink(redis: Redis, deployment: Deployment) -> EventSink:
    return EventSink(redis, deployment.wire, retention_s=600, maxlen=10_000)


async def insert_task(
    db: asyncpg.Pool,
    tenant: Tenant,
    *,
    state: str = "queued",
    last_seq: int = 0,
    progress: float = 0.0,
) -> UUID:
    task_id = uuid7()
    await db.execute(
        "INSERT INTO tasks (id, tenant_id, type, args, state, progress, attempts, max_attempts,"
        " timeout_s, last_seq) VALUES ($1, $2, 'demo.sleep', '{}'::jsonb, $3, $4, 1, 5, 60, $5)",
        task_id,
        tenant.id,
        state,
        progress,
        last_seq,
    )
    return task_id


class Writer:
    """Plays the worker: commits each event's state to the row, then emits it."""

    def __init__(self, db: asyncpg.Pool, sink: EventSink, task_id: UUID) -> None:
        self.db, self.sink, self.task_id = db, sink, task_id

    async def step(
        self, seq: int, state: TaskState = TaskState.RUNNING, *, emit: bool = True, data: Any = None
    ) -> ProgressEvent:
        progress = 1.0 if state is TaskState.SUCCEEDED else min(0.99, seq / 100)
        event = ProgressEvent(
            task_id=self.task_id,
            seq=seq,
            state=state,
            progress=progress,
            message=f"step {seq}",
            data=data,
            attempt=1,
            ts=datetime.now(UTC),
        )
        await self.db.execute(
            "UPDATE tasks SET last_seq = $2, state = $3, progress = $4, message = $5,"
            " updated_at = now() WHERE id = $1",
            self.task_id,
            seq,
            state.value,
            progress,
            event.message,
        )
        if emit:
            assert await self.sink.emit([event])
        return event


async def ws_connect(gw: Gateway, redis: Redis, tenant: Tenant, **kwargs: Any) -> ClientConnection:
    token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
    return await connect(f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}", **kwargs)


async def recv_json(ws: ClientConnection, within: float = 10) -> dict[str, Any]:
    async with asyncio.timeout(timeout(within)):
        frame = await ws.recv()
    result: dict[str, Any] = json.loads(frame)
    return result


async def recv_until_seq(
    ws: ClientConnection, task_id: UUID, seq: int, within: float = 20
) -> list[dict[str, Any]]:
    """Frames of ``task_id`` until one with ``seq`` arrives."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout(within)):
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("task_id") != str(task_id):
                continue
            got.append(frame)
            if frame["type"] == "event" and frame["seq"] >= seq:
                return got


def assert_no_gap(frames: list[dict[str, Any]], after: int) -> None:
    seqs = [f["seq"] for f in frames if f["type"] == "event"]
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), seqs


# ---------------------------------------------------------------- replay and live


async def test_replay_then_live_in_order(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Retained events after after_seq are replayed, then live ones follow, gap-free."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in range(1, 6):
        await writer.step(seq)
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 2}))
        replayed = await recv_until_seq(ws, task_id, 5)
        for seq in range(6, 9):
            await writer.step(seq)
        live = await recv_until_seq(ws, task_id, 8)
    assert_no_gap(replayed + live, 2)
    assert not any(f.get("snapshot") for f in replayed + live)
    assert replayed[0]["state"] == "running" and replayed[0]["message"] == "step 3"


async def test_events_racing_with_subscribe_arrive_once(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Events written while many clients subscribe reach each of them once, in order."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    total = 200
    # Each write commits, then emits: a grace far above a busy machine's loop lag, so
    # a subscribe between the two waits for the event instead of taking a snapshot.
    async with gateway(deployment, snapshot_grace_s=2) as gw:
        clients = [await ws_connect(gw, redis, tenant) for _ in range(8)]

        async def write_all() -> None:
            for seq in range(1, total + 1):
                await writer.step(seq)
                if seq % 10 == 0:
                    await asyncio.sleep(0)

        async def subscribe_later(i: int, ws: ClientConnection) -> list[dict[str, Any]]:
            await asyncio.sleep(0.003 * i)
            await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 0}))
            return await recv_until_seq(ws, task_id, total)

        results = await asyncio.gather(
            write_all(), *(subscribe_later(i, ws) for i, ws in enumerate(clients))
        )
        for ws in clients:
            await ws.close()
    for frames in results[1:]:
        assert frames is not None
        assert_no_gap(frames, 0)
        assert len(frames) == total


async def test_a_live_client_gets_events_that_never_reached_redis(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Events committed but never written to Redis (the writer died, or Redis was away)
    reach a client that is subscribed and waiting, the terminal one included: the sweep
    sees the row ahead of what the client got, and catches it up from the row."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    async with (
        gateway(deployment, subscription_check_s=0.2) as gw,
        await ws_connect(gw, redis, tenant) as ws,
    ):
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 0}))
        assert (await recv_json(ws))["seq"] == 1
        await writer.step(2, emit=False)
        await writer.step(3, TaskState.SUCCEEDED, emit=False)
        last = await recv_json(ws)
    assert (last["seq"], last["state"], last.get("snapshot")) == (3, "succeeded", True)
    rechecks = re.search(
        rb"^longhaul_gateway_sweep_rechecks_total (\S+)$", gw.metrics.render(), re.M
    )
    assert rechecks is not None and float(rechecks[1]) >= 1


async def test_resyncs_queued_together_read_each_stream_once(
    deployment: Deployment,
    db: asyncpg.Pool,
    tenant: Tenant,
    redis: Redis,
    sink: EventSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Redis subscriber reconnecting several times before a connection got to its
    first resync costs that connection one read of each stream, not one per reconnect;
    an event lost meanwhile still arrives."""
    tasks = [await insert_task(db, tenant) for _ in range(3)]
    writers = [Writer(db, sink, t) for t in tasks]
    for w in writers:
        await w.step(1)
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        for t in tasks:
            await ws.send(json.dumps({"op": "subscribe", "task_id": str(t), "after_seq": 0}))
            await recv_until_seq(ws, t, 1)
        [session] = gw.registry.connections()
        reads: list[UUID] = []
        catch_up = session._catch_up

        async def counted(task_id: UUID, **kwargs: Any) -> None:
            reads.append(task_id)
            await catch_up(task_id, **kwargs)

        monkeypatch.setattr(session, "_catch_up", counted)
        lost = await writers[0].step(2, emit=False)
        assert await sink.emit([], backfill=[lost])  # to the stream only: a lost publish
        for _ in range(3):
            gw.hub._broadcast_resync()
        frames = await recv_until_seq(ws, tasks[0], 2)
        await eventually(until(lambda: session._pending == 0))
    assert sorted(reads) == sorted(tasks), reads
    assert [f["seq"] for f in frames if f["type"] == "event"] == [2]


async def test_snapshot_when_stream_lost_events(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """When the stream no longer holds after_seq+1, one snapshot from the row comes first."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in range(1, 4):
        await writer.step(seq)
    await redis.delete(deployment.wire.event_stream(task_id))  # Redis lost them
    await writer.step(4, emit=False)  # committed, never written to Redis
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 1}))
        first = await recv_json(ws)
        assert first["snapshot"] is True and first["seq"] == 4
        assert first["message"] == "step 4" and first["state"] == "running"
        await writer.step(5)
        nxt = await recv_json(ws)
    assert nxt["seq"] == 5 and "snapshot" not in nxt


@pytest.mark.parametrize("transport", ["websocket, no grace", "sse"])
async def test_a_lost_tail_keeps_the_retained_events_before_its_snapshot(
    deployment: Deployment,
    db: asyncpg.Pool,
    tenant: Tenant,
    redis: Redis,
    sink: EventSink,
    transport: str,
) -> None:
    """Events 4 and 5 were committed and never reached Redis: a client after seq 1
    still gets 2 and 3 from the stream, with their data, then the row as a snapshot."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in (1, 2, 3):
        await writer.step(seq, data={"chunk": seq})
    for seq in (4, 5):
        await writer.step(seq, emit=False)
    async with gateway(deployment, snapshot_grace_s=0, subscription_check_s=60) as gw:
        if transport == "sse":
            path = await sse_path(gw, redis, tenant, task_id)
            status, body = await sse_get(gw.port, path, {"Last-Event-ID": "1"}, until_seq=5)
            assert status == 200, body
            got = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
        else:
            async with await ws_connect(gw, redis, tenant) as ws:
                await ws.send(
                    json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 1})
                )
                got = await recv_until_seq(ws, task_id, 5)
    assert [(f["seq"], f.get("snapshot", False), f["data"]) for f in got] == [
        (2, False, {"chunk": 2}),
        (3, False, {"chunk": 3}),
        (5, True, None),
    ]


async def test_a_newer_lost_tail_is_rechecked_though_an_older_recheck_was_pending(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A subscribe finds event 2 late (a recheck for seq 2 is set); 2 arrives. Then 3
    never reaches Redis and the terminal 4 is only announced: the catch-up that gap
    starts must get its own recheck, which sends the row within the grace, rather
    than leave it to the sweep (a minute here)."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    late = await writer.step(2, emit=False)
    async with (
        gateway(deployment, snapshot_grace_s=0.5, subscription_check_s=60) as gw,
        await ws_connect(gw, redis, tenant) as ws,
    ):
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
        got = await recv_until_seq(ws, task_id, 1)
        await sink.emit([late])
        got += await recv_until_seq(ws, task_id, 2)
        await writer.step(3, emit=False)
        await sink.announce(await writer.step(4, TaskState.SUCCEEDED, emit=False))
        got += await recv_until_seq(ws, task_id, 4, within=5)
    assert [(f["seq"], f.get("snapshot", False)) for f in got] == [
        (1, False),
        (2, False),
        (4, True),
    ]
    assert got[-1]["state"] == "succeeded"


async def test_backfill_goes_to_the_stream_only(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A claim rewrites the event before it as backfill: it fills the stream when that
    event was lost, is refused there as a duplicate otherwise, and is never published
    (live clients would only drop it as a duplicate)."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    wire = deployment.wire
    first = await writer.step(1, emit=False)  # the first writer's event never arrived
    second = await writer.step(2, emit=False)
    pubsub = redis.pubsub()
    await pubsub.subscribe(wire.event_channel(task_id))
    try:
        assert await sink.emit([second], backfill=[first])
        assert await sink.emit([], backfill=[first])  # a duplicate: refused, not an error
        published = []
        async with asyncio.timeout(timeout(5)):
            while len(published) < 1:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    published.append(json.loads(message["data"])["seq"])
        # Anything else published would have arrived by now, right behind seq 2.
        late = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
    finally:
        await pubsub.aclose()
    entries = await redis.xrange(wire.event_stream(task_id))
    assert [int(entry_id.split(b"-")[0]) for entry_id, _ in entries] == [1, 2]
    assert published == [2] and late is None


async def test_lagging_stream_holds_up_no_other_subscription(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A task whose row is ahead of its stream (the writer commits, then writes) gets its
    stream now and the missing event live; meanwhile the connection serves the next
    subscription instead of waiting out the grace period."""
    lagging = await insert_task(db, tenant)
    lag_writer = Writer(db, sink, lagging)
    await lag_writer.step(1)
    late = await lag_writer.step(2, emit=False)  # committed; its event comes later
    other = await insert_task(db, tenant)
    await Writer(db, sink, other).step(1)
    # A grace far beyond the test's timeouts: only not waiting for it can pass.
    async with (
        gateway(deployment, snapshot_grace_s=600) as gw,
        await ws_connect(gw, redis, tenant) as ws,
    ):
        for task_id in (lagging, other):
            await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
        first, second = await recv_json(ws), await recv_json(ws)
        assert await sink.emit([late])
        third = await recv_json(ws)
    assert (first["task_id"], first["seq"]) == (str(lagging), 1)
    assert (second["task_id"], second["seq"]) == (str(other), 1)
    assert (third["task_id"], third["seq"]) == (str(lagging), 2)
    assert not any(f.get("snapshot") for f in (first, second, third))


async def test_burst_of_subscribes_is_not_a_slow_consumer(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Client commands wait for room apart from the events: hundreds of subscribes sent
    at once (more than the event queue holds), with events flowing, neither close the connection nor lose an event."""
    writers = [Writer(db, sink, await insert_task(db, tenant)) for _ in range(600)]
    async with (
        gateway(deployment) as gw,
        await ws_connect(gw, redis, tenant) as ws,
    ):
        for w in writers:
            await ws.send(json.dumps({"op": "subscribe", "task_id": str(w.task_id)}))
        # Events start while most subscribes still wait to be served.
        await eventually(until(lambda: gw.registry.subscription_count >= 1))
        for w in writers:
            await w.step(1)
            await w.step(2, TaskState.SUCCEEDED)
        terminal: set[str] = set()
        async with asyncio.timeout(timeout(30)):
            while len(terminal) < len(writers):
                frame = json.loads(await ws.recv())
                assert frame["type"] == "event", frame
                if frame["state"] == "succeeded":
                    terminal.add(frame["task_id"])
    assert gw.metrics.drops._value.get() == 0


async def test_snapshot_when_stream_head_trimmed(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A stream that starts after after_seq+1 (trimmed) yields a snapshot, then the rest."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in range(1, 7):
        await writer.step(seq)
    await redis.xtrim(deployment.wire.event_stream(task_id), minid="4-0", approximate=False)
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 1}))
        first = await recv_json(ws)
        await writer.step(7)
        rest = await recv_until_seq(ws, task_id, 7)
    assert first["snapshot"] is True and first["seq"] == 6
    assert [f["seq"] for f in rest] == [7]


async def test_terminal_task_yields_terminal_event_at_once(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Subscribing to a finished task whose stream expired gets its terminal event."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    await writer.step(2, TaskState.SUCCEEDED)
    await redis.delete(deployment.wire.event_stream(task_id))
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 0}))
        frame = await recv_json(ws, within=2)
    assert frame["state"] == "succeeded" and frame["seq"] == 2 and frame["progress"] == 1.0
    assert frame["snapshot"] is True


async def test_a_new_task_is_shown_queued_from_its_row_then_live(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """The API writes no queued event: a subscriber right after the submit gets it from
    the row (not as a snapshot), then the worker's events live, with no gap."""
    task_id = await insert_task(db, tenant, last_seq=1)
    queued = await db.fetchrow("SELECT updated_at FROM tasks WHERE id = $1", task_id)
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 0}))
        first = await recv_json(ws, within=2)
        assert (first["seq"], first["state"], first.get("snapshot", False)) == (1, "queued", False)
        assert first["ts"] == format_ts(queued["updated_at"])  # the row's own event
        assert await redis.xlen(deployment.wire.event_stream(task_id)) == 0
        await Writer(db, sink, task_id).step(2)
        second = await recv_json(ws, within=5)
    assert (second["seq"], second["state"]) == (2, "running")


async def test_not_found_for_other_tenant_and_unknown_id(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, other_tenant: Tenant, redis: Redis
) -> None:
    """Another tenant's task, an unknown id and one that is no UUID at all (no task can
    have it) give the same not_found error."""
    theirs = await insert_task(db, other_tenant, state="running", last_seq=3)
    unknown = uuid7()
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        for task_id in (str(theirs), str(unknown), "not-a-uuid"):
            await ws.send(json.dumps({"op": "subscribe", "task_id": task_id}))
            frame = await recv_json(ws)
            assert frame == {
                "type": "error",
                "code": "not_found",
                "message": "no such task",
                "task_id": task_id,
            }
        await ws.send(json.dumps({"op": "unsubscribe", "task_id": "not-a-uuid"}))
        bad = await recv_json(ws)
        assert bad["type"] == "error" and bad["code"] == "bad_request"
        assert gw.registry.subscription_count == 0


async def test_unsubscribe_stops_events(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """After unsubscribe no more events of that task arrive."""
    task_a = await insert_task(db, tenant)
    task_b = await insert_task(db, tenant)
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        for t in (task_a, task_b):
            await ws.send(json.dumps({"op": "subscribe", "task_id": str(t), "after_seq": 0}))
        await eventually(until(lambda: gw.registry.subscription_count == 2))
        await ws.send(json.dumps({"op": "unsubscribe", "task_id": str(task_a)}))
        await eventually(until(lambda: gw.registry.subscription_count == 1))
        await Writer(db, sink, task_a).step(1)
        await Writer(db, sink, task_b).step(1)
        frame = await recv_json(ws)
    assert frame["task_id"] == str(task_b)


# ---------------------------------------------------------------- handshake


async def expect_status(url: str, status: int, **kwargs: Any) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    assert info.value.response.status_code == status


async def test_forged_reused_and_expired_tokens_get_401(
    deployment: Deployment, tenant: Tenant, redis: Redis
) -> None:
    """Only a live, unused token opens a connection."""
    async with gateway(deployment) as gw:
        base = f"ws://127.0.0.1:{gw.port}/v1/ws"
        await expect_status(f"{base}?token=forged", 401)
        await expect_status(base, 401)
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        async with connect(f"{base}?token={token}"):
            pass
        await expect_status(f"{base}?token={token}", 401)  # reused
        short, _ = await wstokens.issue(redis, gw.wire, tenant.id, 0.05)
        await asyncio.sleep(0.2)
        await expect_status(f"{base}?token={short}", 401)  # expired
        # Nothing in Redis carries the token in clear.
        keys = [k async for k in redis.scan_iter(match=f"{deployment.namespace}:wstoken:*")]
        assert all(token.encode() not in k for k in keys)


async def test_foreign_origin_gets_403_and_keeps_the_token(
    deployment: Deployment, tenant: Tenant, redis: Redis
) -> None:
    """A page elsewhere cannot open a connection, and its attempt does not burn the token."""
    async with gateway(deployment) as gw:
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        url = f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}"
        await expect_status(url, 403, origin="https://evil.example")
        await expect_status(url, 403, origin="http://localhost.evil.example:8000")
        # Upper case passes both checks (ours, and websockets' on the raw header).
        async with connect(url, origin="http://LOCALHOST:5173") as ws:
            assert ws.protocol.state.name == "OPEN"


async def test_no_origin_gets_403_on_sse_too_when_missing_origins_are_refused(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """With LONGHAUL_ALLOW_MISSING_ORIGIN=false, the SSE fallback refuses a request
    without Origin as the WebSocket endpoint does, keeping the token; an allowed
    Origin still gets the events."""
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    async with gateway(deployment, allow_missing_origin=False) as gw:
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        await expect_status(f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}", 403)
        path = f"/v1/tasks/{task_id}/events?token={token}"
        assert (await sse_get(gw.port, path, {}))[0] == 403
        status, body = await sse_get(
            gw.port, path, {"Origin": "http://localhost:5173"}, until_seq=1
        )
    assert status == 200 and "id: 1\n" in body


async def test_sse_at_the_process_cap_is_503_and_keeps_the_token(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """As for a WebSocket: the gateway being full is a 503 (another gateway may take
    it), checked before the token is spent."""
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    async with gateway(deployment, max_connections=1) as gw:
        path = await sse_path(gw, redis, tenant, task_id)
        async with await ws_connect(gw, redis, tenant):
            await eventually(until(lambda: gw.registry.connection_count == 1))
            status, body = await sse_get(gw.port, path, {})
            assert status == 503 and "connection limit" in body, body
        await eventually(until(lambda: gw.registry.connection_count == 0))
        status, body = await sse_get(gw.port, path, {}, until_seq=1)
    assert status == 200 and "id: 1\n" in body


async def test_sse_refuses_a_bad_last_event_id_or_task_id_before_spending_the_token(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A request that is refused for what it asks keeps its single-use token: the client
    fixes the request and tries again with it."""
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    async with gateway(deployment) as gw:
        path = await sse_path(gw, redis, tenant, task_id)
        status, _ = await sse_get(gw.port, path, {"Last-Event-ID": "1_0"})
        assert status == 400
        # The same token, on a path whose id is not a task's.
        bad_id = path.replace(f"/{task_id}/", "/not-a-task/")
        status, _ = await sse_get(gw.port, bad_id, {})
        assert status == 404
        status, body = await sse_get(gw.port, path, {}, until_seq=1)
    assert status == 200 and "id: 1\n" in body


async def exchange(
    gw: Gateway, method: str, path: str, headers: str = "", version: str = "HTTP/1.1"
) -> tuple[int, dict[str, str], bytes]:
    """One request over a bare TCP connection (``headers``: more header lines, each
    ending in CRLF) and the whole response: status, header fields (lower-cased names)
    and body. For an answer that ends the connection: a refusal, not a stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(f"{method} {path} {version}\r\nHost: x\r\n{headers}\r\n".encode())
        async with asyncio.timeout(timeout(10)):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, body


def assert_problem(status: int, fields: dict[str, str], body: bytes, expected: int) -> str:
    """The problem's detail, once the response is shown to be an RFC 9457 ``expected``."""
    assert status == expected, (status, body)
    assert fields["content-type"] == "application/problem+json", fields
    payload = json.loads(body)
    assert payload["status"] == expected and payload["type"] == "about:blank", payload
    detail: str = payload["detail"]
    return detail


WS_HANDSHAKE = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def test_the_sse_stream_answers_get_only_and_a_refused_method_keeps_the_token(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Any other method on a task's events is a 405 naming GET, before the token is
    read: the same single-use token then opens the stream."""
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    async with gateway(deployment) as gw:
        path = await sse_path(gw, redis, tenant, task_id)
        origin = "Origin: http://localhost:5173\r\n"
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            status, fields, body = await exchange(gw, method, path, origin)
            assert method in assert_problem(status, fields, body, 405)
            assert fields["allow"] == "GET"
        status, fields, body = await exchange(gw, "HEAD", path, origin)
        assert (status, fields["allow"], body) == (405, "GET", b"")
        status, body = await sse_get(gw.port, path, {}, until_seq=1)
    assert status == 200 and "id: 1\n" in body


async def test_the_websocket_endpoint_refuses_other_methods_before_spending_the_token(
    deployment: Deployment, tenant: Tenant, redis: Redis
) -> None:
    """A handshake with another method than GET is a 405 naming GET, and its token
    still opens a connection."""
    async with gateway(deployment) as gw:
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        path = f"/v1/ws?token={token}"
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            status, fields, body = await exchange(gw, method, path, WS_HANDSHAKE)
            assert method in assert_problem(status, fields, body, 405)
            assert fields["allow"] == "GET"
        status, fields, body = await exchange(gw, "HEAD", path, WS_HANDSHAKE)
        assert (status, fields["allow"], body) == (405, "GET", b"")
        async with connect(f"ws://127.0.0.1:{gw.port}{path}") as ws:
            assert ws.protocol.state.name == "OPEN"


async def test_health_ready_and_metrics_answer_get_and_head_only(
    deployment: Deployment,
) -> None:
    """HEAD gets GET's head without the body, as on the API; other methods a 405."""
    async with gateway(deployment) as gw:
        for path in ("/healthz", "/readyz", "/metrics"):
            status, fields, body = await exchange(gw, "HEAD", path)
            assert status == 200 and int(fields["content-length"]) > 0 and body == b"", path
            status, fields, body = await exchange(gw, "POST", path)
            assert_problem(status, fields, body, 405)
            assert fields["allow"] == "GET, HEAD"


async def test_a_request_that_is_no_websocket_handshake_keeps_the_token(
    deployment: Deployment, tenant: Tenant, redis: Redis
) -> None:
    """What websockets refuses in a handshake (a plain GET, a missing key, another
    version, HTTP/1.0) is refused before the token is read, as a problem: the token
    then opens a connection."""
    async with gateway(deployment) as gw:
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        path = f"/v1/ws?token={token}"
        status, fields, body = await exchange(gw, "GET", path)  # as curl or a browser tab
        assert "Connection" in assert_problem(status, fields, body, 426)
        assert fields["upgrade"] == "websocket"
        no_key = WS_HANDSHAKE.replace("Sec-WebSocket-Key", "X-Key")
        status, fields, body = await exchange(gw, "GET", path, no_key)
        assert "Sec-WebSocket-Key" in assert_problem(status, fields, body, 400)
        version_8 = WS_HANDSHAKE.replace("Version: 13", "Version: 8")
        status, fields, body = await exchange(gw, "GET", path, version_8)
        assert_problem(status, fields, body, 400)
        assert fields["sec-websocket-version"] == "13"  # RFC 6455, 4.4
        status, fields, body = await exchange(gw, "GET", path, WS_HANDSHAKE, "HTTP/1.0")
        assert_problem(status, fields, body, 505)
        async with connect(f"ws://127.0.0.1:{gw.port}{path}") as ws:
            assert ws.protocol.state.name == "OPEN"


async def test_a_header_given_twice_is_a_400_and_keeps_the_token(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Two Origin, Authorization or Last-Event-ID headers are the client's mistake: a
    400 problem naming the header (not a 500), and the token still opens the stream."""
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    async with gateway(deployment) as gw:
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        ws, sse = f"/v1/ws?token={token}", f"/v1/tasks/{task_id}/events?token={token}"
        for path, header in (
            (ws, "Origin: http://localhost:5173"),
            (sse, "Origin: http://localhost:5173"),
            (sse, f"Authorization: Bearer {token}"),
            (sse, "Last-Event-ID: 0"),
        ):
            twice = f"{header}\r\n{header}\r\n"
            extra = WS_HANDSHAKE if path == ws else ""
            status, fields, body = await exchange(gw, "GET", path, extra + twice)
            name = header.split(":")[0]
            assert assert_problem(status, fields, body, 400) == f"more than one {name} header"
        status, body = await sse_get(gw.port, sse, {}, until_seq=1)
    assert status == 200 and "id: 1\n" in body


async def test_an_api_key_in_place_of_a_token_is_named_without_a_look_up(
    deployment: Deployment,
    tenant: Tenant,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API key sent where a token goes is told apart by its shape: the 401 says to
    ask for a token, no token store or key table is asked, and no log holds the key."""
    redeemed: list[str] = []
    redeem = wstokens.redeem

    async def spy(redis: Redis, wire: Any, token: str) -> wstokens.Grant | None:
        redeemed.append(token)
        return await redeem(redis, wire, token)

    monkeypatch.setattr(wstokens, "redeem", spy)
    # websockets' DEBUG lines show every request as sent (shared.logging keeps it at
    # WARNING at least); the gateway's own at any level must not show the key.
    caplog.set_level(logging.INFO)
    for name in ("services", "shared"):
        caplog.set_level(logging.DEBUG, logger=name)
    async with gateway(deployment) as gw:
        sse = f"/v1/tasks/{uuid7()}/events"
        bearer = f"Authorization: Bearer {tenant.key}\r\n"
        for path, method, headers in (
            (f"{sse}?token={tenant.key}", "GET", ""),
            (sse, "GET", bearer),
            (f"/v1/ws?token={tenant.key}", "GET", WS_HANDSHAKE),
            ("/v1/ws", "GET", WS_HANDSHAKE + bearer),
        ):
            status, fields, body = await exchange(gw, method, path, headers)
            detail = assert_problem(status, fields, body, 401)
            assert detail == "this is an API key; ask POST /v1/ws-tokens for a token", path
        assert redeemed == []
        # A token is still looked up, and its refusal unchanged.
        status, fields, body = await exchange(gw, "GET", "/v1/ws?token=forged", WS_HANDSHAKE)
        assert "already used" in assert_problem(status, fields, body, 401)
        assert redeemed == ["forged"]
    assert tenant.key not in caplog.text
    assert tenant.key_id not in caplog.text


async def test_oversized_frame_closes_1009(
    deployment: Deployment, tenant: Tenant, redis: Redis
) -> None:
    """A client frame over 64 KiB closes the connection with 1009."""
    async with gateway(deployment) as gw, await ws_connect(gw, redis, tenant) as ws:
        await ws.send("x" * (64 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_health_ready_and_metrics(
    deployment: Deployment, tenant: Tenant, redis: Redis
) -> None:
    """/healthz, /readyz and /metrics answer plain HTTP on the gateway port."""
    async with gateway(deployment) as gw:
        bodies = {}
        for path in ("/healthz", "/readyz", "/metrics"):
            reader, writer = await raw_get(gw, path)
            raw = await reader.read()
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            bodies[path] = body
    assert json.loads(bodies["/readyz"]) == {
        "status": "ok",
        "dependencies": {"redis": "ok", "postgresql": "ok", "redis_pubsub": "ok"},
    }
    # Each loop that beats, by the seconds since its last beat (the hub does not).
    health = json.loads(bodies["/healthz"])
    assert health["status"] == "ok"
    assert set(health["loops"]) == {"gateway-sweep", "gateway-revocation", "gateway-leases"}
    assert b"longhaul_gateway_connections" in bodies["/metrics"]


# ---------------------------------------------------------------- slow consumers


async def test_a_catch_up_to_a_client_that_does_not_read_waits_for_its_socket(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A replay happens within one turn of the loop, where the transport's buffer alone
    never grew: 1,500 frames of 30 KiB went into memory at once for a client that read
    none of them. Past the buffer's mark the replay waits for the socket instead."""
    task_id = await insert_task(db, tenant, state="running", last_seq=1500)
    at = datetime.now(UTC)
    blob = "x" * 30 * 1024
    for start in range(1, 1501, 50):
        events = [
            ProgressEvent(
                task_id=task_id, seq=seq, state=TaskState.RUNNING, progress=0.5, ts=at,
                data={"b": blob},
            )
            for seq in range(start, start + 50)
        ]  # fmt: skip
        assert await sink.emit(events)
    async with gateway(deployment) as gw:
        ws = await ws_connect(gw, redis, tenant, max_size=2**20)  # and never reads
        try:
            await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
            await eventually(until(lambda: gw.registry.subscription_count == 1))
            await asyncio.sleep(1.0)
            [session] = gw.registry.connections()
            buffered = session.ws.transport.get_write_buffer_size()
            # The replay whole is 44 MiB; the kernel's buffers take a few of them.
            assert buffered < 8 * 2**20, buffered
            assert session._cursors[task_id] < 1500
        finally:
            ws.transport.abort()


async def test_non_reading_client_is_dropped_others_keep_receiving(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A client that stops reading is closed (1013); a reading one gets every event."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    async with gateway(deployment, client_queue_size=8, close_timeout_s=1) as gw:
        stalled = await ws_connect(gw, redis, tenant, max_queue=1)
        healthy = await ws_connect(gw, redis, tenant)
        for ws in (stalled, healthy):
            await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
        await eventually(until(lambda: gw.registry.subscription_count == 2))
        stalled.transport.pause_reading()  # the client stops reading its socket entirely
        blob = "y" * 16_000
        total = 600  # ~10 MB: more than the socket buffers can hide

        async def write_all() -> None:
            for seq in range(1, total + 1):
                await writer.step(seq, data=blob)

        received, _ = await asyncio.gather(
            recv_until_seq(healthy, task_id, total, within=60), write_all()
        )
        assert_no_gap(received, 0)
        await eventually(
            until(lambda: gw.registry.connection_count == 1), what="the stalled connection dropped"
        )
        drops = gw.metrics.drops._value.get()
        assert drops >= 1
        await healthy.close()
        stalled.transport.abort()


async def long_history(db: asyncpg.Pool, tenant: Tenant, sink: EventSink) -> UUID:
    """A finished task whose 200 retained events of 4 KiB each fill any small socket."""
    task_id = await insert_task(db, tenant, state="succeeded", last_seq=200)
    at = datetime.now(UTC)
    history = [
        ProgressEvent(
            task_id=task_id, seq=seq, state=TaskState.RUNNING, progress=0.5, ts=at,
            data={"b": "x" * 4096},
        )
        for seq in range(1, 201)
    ]  # fmt: skip
    assert await sink.emit(history)
    return task_id


async def stop_reading_mid_replay(
    gw: Gateway, redis: Redis, tenant: Tenant, task_id: UUID
) -> tuple[ClientConnection, Any]:
    """A client, and its session, that subscribes from seq 0 and then reads nothing (TCP
    still acks): small socket buffers on both ends, so the replay fills them at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the window
    sock.connect(("127.0.0.1", gw.port))
    ws = await ws_connect(gw, redis, tenant, sock=sock)
    await eventually(until(lambda: gw.registry.connection_count == 1))
    [session] = gw.registry.connections()
    server_sock = session.ws.transport.get_extra_info("socket")
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ws.transport.pause_reading()
    await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
    return ws, session


async def test_a_client_that_stops_reading_during_a_catch_up_is_dropped(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A replay fills the socket of a client that stopped reading, and no live event
    follows to count it slow: its socket, taking nothing for close_timeout_s, drops it
    and gives back its place (the keepalive ping, queued behind, never would)."""
    task_id = await long_history(db, tenant, sink)
    async with gateway(deployment, close_timeout_s=0.5) as gw:
        ws, session = await stop_reading_mid_replay(gw, redis, tenant, task_id)
        try:
            await eventually(
                until(lambda: gw.registry.connection_count == 0),
                within=10,
                what="the stalled connection dropped",
            )
            assert gw.metrics.drops._value.get() >= 1
            assert session._cursors[task_id] < 200  # dropped mid-replay
        finally:
            ws.transport.abort()


async def test_stopping_the_gateway_drops_a_client_whose_close_cannot_drain(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """The stop's 1001 to a client that reads nothing waits to drain, without end, and
    the connection is then CLOSING: the stop drops it after its bound all the same,
    whatever its handler waits for (here the session's own bound, made an hour)."""
    task_id = await long_history(db, tenant, sink)
    gw = Gateway(gateway_settings(deployment, close_timeout_s=0.5))
    ws: ClientConnection | None = None
    try:
        async with asyncio.timeout(timeout(20)), gw.start():
            assert gw._deps is not None
            gw._deps = dataclasses.replace(gw._deps, close_timeout_s=3600)
            ws, session = await stop_reading_mid_replay(gw, redis, tenant, task_id)
            transport = session.ws.transport
            # The replay filled the socket: websockets paused writing past its 32 KiB
            # mark and the handler waits for the client. Not the buffer past 32 KiB: some
            # 40 ms later the client's kernel ACKs with a wider window and takes a few KiB
            # more, leaving ~30 KiB (a poll that came late never saw more); writing
            # resumes only below 8 KiB, which a client that reads nothing never allows.
            await eventually(until(lambda: session.ws.paused))
            assert transport.get_write_buffer_size() > 8 * 1024
        # Out of start(): the gateway has stopped, its handlers returned.
        assert transport.is_closing() and gw.registry.connection_count == 0
    finally:
        if ws is not None:
            ws.transport.abort()


async def test_a_slow_client_is_told_1013_when_it_reads_again(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """The contract's close code for a slow client: one that fell behind, and that reads
    again while the gateway closes it, receives the close frame with 1013 (a client that
    never reads again only sees its TCP connection dropped)."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    async with gateway(deployment, client_queue_size=8, close_timeout_s=30) as gw:
        slow = await ws_connect(gw, redis, tenant, max_queue=1)
        await slow.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
        await eventually(until(lambda: gw.registry.subscription_count == 1))
        slow.transport.pause_reading()
        drops = gw.metrics.drops._value.get()
        blob = "y" * 16_000
        seq = 0
        while gw.metrics.drops._value.get() == drops:
            seq += 1
            assert seq <= 2000, "the gateway never found the client slow"
            await writer.step(seq, data=blob)
        slow.transport.resume_reading()  # within the gateway's 30 s close handshake
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(30):
                async for _ in slow:
                    pass
        assert slow.close_code == 1013, (slow.close_code, slow.close_reason)
        assert slow.close_reason == "slow consumer"


async def test_a_connection_that_does_not_answer_pings_is_closed(
    deployment: Deployment, redis: Redis, tenant: Tenant
) -> None:
    """The server pings (every 20 s by default) and closes a connection that does not
    answer; one that answers stays open."""
    async with gateway(deployment, ping_interval_s=0.3, ping_timeout_s=0.3) as gw:
        silent = await ws_connect(gw, redis, tenant)
        answering = await ws_connect(gw, redis, tenant)
        await eventually(until(lambda: gw.registry.connection_count == 2))
        silent.transport.pause_reading()  # its pongs never come
        await eventually(
            until(lambda: gw.registry.connection_count == 1),
            within=10,
            what="the silent one closed",
        )
        await asyncio.sleep(1.0)  # several more pings: the answering one stays
        assert gw.registry.connection_count == 1
        await answering.ping()
        await answering.close()
        silent.transport.abort()


# ---------------------------------------------------------------- SSE fallback


async def sse_path(gw: Gateway, redis: Redis, tenant: Tenant, task_id: UUID | str) -> str:
    """A task's SSE path with a fresh token for ``tenant``."""
    token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
    return f"/v1/tasks/{task_id}/events?token={token}"


async def sse_get(
    port: int, path: str, headers: dict[str, str], until_seq: int | None = None
) -> tuple[int, str]:
    """The status and the body: all of it, or of a stream, up to the message of
    ``until_seq`` (the stream stays open until the task ends). A stream cut short
    raises: aiohttp checks the chunked framing to its last chunk."""
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        if resp.status != 200 or until_seq is None:
            async with asyncio.timeout(timeout(10)):
                return resp.status, await resp.text()
        return resp.status, await read_until_seq(resp, until_seq)


async def read_until_seq(resp: aiohttp.ClientResponse, seq: int) -> str:
    body = ""
    async with asyncio.timeout(timeout(10)):
        while f"id: {seq}\n" not in body:
            message = await resp.content.readuntil(b"\n\n")
            assert message, f"the stream ended before seq {seq}: {body!r}"
            body += message.decode()
    return body


async def raw_get(
    gw: Gateway, path: str, headers: str = "", version: str = "HTTP/1.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET of ``path`` sent over a bare TCP connection (``headers``: more header lines,
    each ending in CRLF), for what an HTTP client library would hide or refuse."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"GET {path} {version}\r\nHost: x\r\n{headers}\r\n".encode())
    await writer.drain()
    return reader, writer


def sse_ids(body: str) -> list[int]:
    return [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]


async def test_sse_to_an_http_1_0_client_is_close_delimited(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """HTTP/1.0 has no chunks: the stream's head says no Transfer-Encoding and
    ``Connection: close``, and its body is the bare events, ended by the close."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    await writer.step(2, TaskState.SUCCEEDED)
    async with gateway(deployment) as gw:
        reader, writer_ = await raw_get(
            gw, await sse_path(gw, redis, tenant, task_id), "", "HTTP/1.0"
        )
        async with asyncio.timeout(timeout(10)):
            raw = await reader.read()  # to the close
        writer_.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    lines = head.lower().split("\r\n")
    assert lines[0].split(" ")[1] == "200" and "connection: close" in lines, head
    assert not any(line.startswith("transfer-encoding") for line in lines), head
    assert body.startswith("retry: 1000\n") and sse_ids(body) == [1, 2], body
    assert body.endswith("\n\n"), body  # no last chunk after the last event


async def test_sse_ends_with_204_once_the_client_has_the_terminal_event(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A stream ends after the terminal event, cleanly (its last chunk); an EventSource
    reconnects after any end, and a 204 is what stops it."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    await writer.step(2, TaskState.SUCCEEDED)
    async with gateway(deployment) as gw:
        path = f"/v1/tasks/{task_id}/events?token="
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        status, body = await sse_get(gw.port, path + token, {"Last-Event-ID": "1"})
        assert status == 200 and sse_ids(body) == [2], body
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        reader, writer_ = await raw_get(gw, path + token, "Last-Event-ID: 2\r\n")
        raw = await asyncio.wait_for(reader.read(), timeout(5))
        writer_.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204"), head
    assert b"content-length" not in head.lower() and rest == b""


async def test_a_task_token_reopens_its_tasks_stream_and_nothing_else(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """An EventSource reconnects with the URL it was given: a task token opens its
    task's stream as often as asked (from Last-Event-ID each time) until it expires,
    but not another task's, and not a WebSocket. A single-use token stays single-use."""
    task_id, other = await insert_task(db, tenant), await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in range(1, 4):
        await writer.step(seq)
    async with gateway(deployment) as gw:
        token, _ = await wstokens.issue(
            redis, gw.wire, tenant.id, 60, key_id=tenant.key_id, task_id=task_id
        )
        path = f"/v1/tasks/{task_id}/events?token={token}"
        status, body = await sse_get(gw.port, path, {"Last-Event-ID": "1"}, until_seq=3)
        assert status == 200 and sse_ids(body) == [2, 3], body
        status, body = await sse_get(gw.port, path, {"Last-Event-ID": "2"}, until_seq=3)
        assert status == 200 and sse_ids(body) == [3], body
        status, body = await sse_get(gw.port, f"/v1/tasks/{other}/events?token={token}", {})
        assert status == 401 and "another task" in body, body
        await expect_status(f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}", 401)
        status, body = await sse_get(gw.port, path, {"Last-Event-ID": "0"}, until_seq=3)
        assert status == 200 and sse_ids(body) == [1, 2, 3], body  # those spent nothing

        short, _ = await wstokens.issue(
            redis, gw.wire, tenant.id, 0.05, key_id=tenant.key_id, task_id=task_id
        )
        await asyncio.sleep(0.2)
        status, _ = await sse_get(gw.port, f"/v1/tasks/{task_id}/events?token={short}", {})
        assert status == 401  # expired
        # A task token's prefix on a single-use token's secret finds nothing: the
        # prefix is part of what is hashed, so it cannot turn a spent read into a GET.
        single, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        status, _ = await sse_get(gw.port, f"/v1/tasks/{task_id}/events?token=t.{single}", {})
        assert status == 401
        status, _ = await sse_get(
            gw.port, f"/v1/tasks/{task_id}/events?token={single}", {"Last-Event-ID": "1"}, 2
        )
        assert status == 200
        status, _ = await sse_get(gw.port, f"/v1/tasks/{task_id}/events?token={single}", {})
        assert status == 401  # spent
        await eventually(until(lambda: gw.registry.connection_count == 0))


async def test_revoking_the_api_key_ends_its_task_tokens(
    deployment: Deployment, db: asyncpg.Pool, redis: Redis, sink: EventSink
) -> None:
    """A task token lives up to a day: revoking the key that asked for it ends it at
    the (re)connects once the gateway's answer for the key is a check period old, and
    only its own tokens. A token issued before tokens named their key (an older API's)
    still opens its stream until it expires."""
    tenant = await create_tenant(db)
    other_key = keys.parse(await add_key(db, tenant.id))
    assert other_key is not None
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    async with gateway(deployment, revocation_check_s=1.0) as gw:
        mine, _ = await wstokens.issue(
            redis, gw.wire, tenant.id, 60, key_id=tenant.key_id, task_id=task_id
        )
        theirs, _ = await wstokens.issue(
            redis, gw.wire, tenant.id, 60, key_id=other_key.key_id, task_id=task_id
        )
        legacy = "t.legacy-" + uuid7().hex
        await redis.set(gw.wire.ws_token(wstokens.token_hash(legacy)), f"{tenant.id} {task_id}")
        for token in (mine, theirs, legacy):
            path = f"/v1/tasks/{task_id}/events?token={token}"
            status, body = await sse_get(gw.port, path, {}, until_seq=1)
            assert status == 200 and sse_ids(body) == [1], body
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", tenant.key_id)
        path = f"/v1/tasks/{task_id}/events?token={mine}"

        async def refused() -> str | None:
            status, body = await sse_get(gw.port, path, {}, until_seq=1)
            return body if status == 401 else None

        assert "revoked" in await eventually(refused, what="the revoked key's token refused")
        for token in (theirs, legacy):
            path = f"/v1/tasks/{task_id}/events?token={token}"
            status, body = await sse_get(gw.port, path, {}, until_seq=1)
            assert status == 200 and sse_ids(body) == [1], body
        await eventually(until(lambda: gw.registry.connection_count == 0))


async def test_sse_streams_live_events_after_last_event_id_until_the_terminal_one(
    deployment: Deployment,
    db: asyncpg.Pool,
    tenant: Tenant,
    redis: Redis,
    sink: EventSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One response: the events after Last-Event-ID, then each new one as it happens,
    in order, then the end once the terminal event is out. It outlives the handshake
    timeout (the handshake deadline spares a stream), and the token stays single-use."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in range(1, 4):
        await writer.step(seq)
    async with gateway(deployment, handshake_timeout_s=1) as gw:
        token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60)
        url = f"http://127.0.0.1:{gw.port}/v1/tasks/{task_id}/events"
        headers = {"Last-Event-ID": "1", "Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert sse_ids(await read_until_seq(resp, 3)) == [2, 3]
            assert gw._deps is not None
            reads: list[UUID] = []
            task_row = gw._deps.repository.task_row

            async def counted(task: UUID, tenant_id: UUID) -> Any:
                reads.append(task)
                return await task_row(task, tenant_id)

            monkeypatch.setattr(gw._deps.repository, "task_row", counted)
            await asyncio.sleep(1.5)  # past the handshake timeout
            await writer.step(4)
            assert sse_ids(await read_until_seq(resp, 4)) == [4]
            await writer.step(5, TaskState.SUCCEEDED)
            async with asyncio.timeout(timeout(10)):
                rest = (await resp.content.read()).decode()  # to the end of the stream
        assert sse_ids(rest) == [5] and '"state":"succeeded"' in rest, rest
        assert reads == []  # live events that follow on go out without a read
        status, _ = await sse_get(gw.port, f"/v1/tasks/{task_id}/events?token={token}", {})
        assert status == 401  # single use
        await eventually(until(lambda: gw.registry.connection_count == 0))


async def test_sse_heartbeats_an_idle_stream_and_lets_go_of_a_client_that_left(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Nothing to send: a comment every heartbeat period keeps the response alive. A
    client that closes its connection frees its place at once, not at the next write
    (here an hour away)."""
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    for heartbeat_s in (0.2, 3600):
        async with gateway(deployment, sse_heartbeat_s=heartbeat_s) as gw:
            url = f"http://127.0.0.1:{gw.port}{await sse_path(gw, redis, tenant, task_id)}"
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                assert sse_ids(await read_until_seq(resp, 1)) == [1]
                if heartbeat_s < 1:
                    async with asyncio.timeout(timeout(10)):
                        beats = [await resp.content.readuntil(b"\n\n") for _ in range(3)]
                    assert beats == [b": keepalive\n\n"] * 3
                assert gw.registry.connection_count == 1
            await eventually(until(lambda: gw.registry.connection_count == 0))


async def test_sse_stream_gets_an_event_whose_publish_was_lost_from_the_sweep(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """An event that reached the stream and the row but never pub/sub: the sweep finds
    the stream behind the row and wakes it, as it does a WebSocket session."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    async with gateway(deployment, subscription_check_s=0.2) as gw:
        url = f"http://127.0.0.1:{gw.port}{await sse_path(gw, redis, tenant, task_id)}"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert sse_ids(await read_until_seq(resp, 1)) == [1]
            lost = await writer.step(2, emit=False)
            assert await sink.emit([], backfill=[lost])  # to the stream only
            body = await read_until_seq(resp, 2)
    assert sse_ids(body) == [2] and '"snapshot"' not in body, body


async def test_stopping_the_gateway_ends_sse_streams_cleanly(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A stream open when the gateway stops ends with its last chunk (the client sees an
    end, not a cut, and reconnects elsewhere with Last-Event-ID); the stop does not wait
    for the task to end."""
    task_id = await insert_task(db, tenant)
    await Writer(db, sink, task_id).step(1)
    gw = Gateway(gateway_settings(deployment, sse_heartbeat_s=3600))
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout(20)):
        async with gw.start():
            url = f"http://127.0.0.1:{gw.port}{await sse_path(gw, redis, tenant, task_id)}"
            resp = await http.get(url)
            assert sse_ids(await read_until_seq(resp, 1)) == [1]
        # Out of start(): the gateway has stopped, so the stream had ended by then.
        async with asyncio.timeout(timeout(5)):
            assert await resp.content.read() == b""  # raises on a cut stream
        resp.release()


async def test_an_sse_client_that_does_not_read_is_dropped(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """A stream whose client reads nothing is closed once what it has not read passes
    the bound, never buffered without end."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    async with gateway(deployment, close_timeout_s=1) as gw:
        path = await sse_path(gw, redis, tenant, task_id)
        _reader, client = await raw_get(gw, path)
        await eventually(until(lambda: gw.registry.connection_count == 1))
        blob = "x" * 60_000
        seq = 1
        while gw.registry.connection_count and seq < 2000:
            seq += 1
            await writer.step(seq, data={"blob": blob})
        assert seq < 2000, "the gateway never found the client slow"
        assert gw.metrics.drops._value.get() >= 1
        client.close()


async def test_a_long_sse_catch_up_goes_out_as_the_client_takes_it(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """Six MB of retained events for a client that reads nothing: they go out in pieces
    as the socket takes them, never buffered whole in the gateway, and the client is
    dropped as slow."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in range(1, 101):
        await writer.step(seq, data={"blob": "x" * 60_000})
    async with gateway(deployment, close_timeout_s=1) as gw:
        path = await sse_path(gw, redis, tenant, task_id)
        _reader, client = await raw_get(gw, path)
        await eventually(until(lambda: gw.registry.connection_count == 1))
        buffered = [0]

        async def gone() -> bool:
            for stream in gw._streams:
                if stream._connection is not None:
                    size = stream._connection.transport.get_write_buffer_size()
                    buffered.append(size)
            return gw.registry.connection_count == 0

        await eventually(gone, interval=0.01, what="the slow SSE client dropped")
        client.close()
    assert gw.metrics.drops._value.get() >= 1
    assert max(buffered) < 512 * 1024, max(buffered)


async def test_bytes_a_client_sends_after_its_sse_request_change_nothing(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """An HTTP client may pipeline another request or send a stray line: the stream
    goes on (websockets would read them as WebSocket frames and end its output)."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    await writer.step(1)
    async with gateway(deployment) as gw:
        path = await sse_path(gw, redis, tenant, task_id)
        reader, client = await raw_get(gw, path)
        async with asyncio.timeout(timeout(10)):
            got = await reader.readuntil(b"id: 1\n")
            assert got.startswith(b"HTTP/1.1 200"), got
            client.write(b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x89\x80abcd")
            await client.drain()
            await asyncio.sleep(0.2)  # let the gateway take them in before the next event
            await writer.step(2, TaskState.SUCCEEDED)
            rest = await reader.read()  # to the end: the stream ends after seq 2
        client.close()
    assert b"id: 2\n" in rest and rest.endswith(b"0\r\n\r\n"), rest


async def test_a_retry_read_with_the_terminal_row_does_not_end_the_sse_stream(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis, sink: EventSink
) -> None:
    """The row read says failed at seq 3; the stream read just after already holds the
    retry's queued event 4. The stream must go on to the retry's events, not end
    after a state that is not terminal."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    for seq in (1, 2):
        await writer.step(seq)
    await writer.step(3, TaskState.FAILED)
    retried = ProgressEvent(
        task_id=task_id,
        seq=4,
        state=TaskState.QUEUED,
        progress=0.0,
        attempt=2,
        ts=datetime.now(UTC),
    )
    assert await sink.emit([retried])  # in Redis, the row not yet updated
    async with gateway(deployment) as gw:
        url = f"http://127.0.0.1:{gw.port}{await sse_path(gw, redis, tenant, task_id)}"
        headers = {"Last-Event-ID": "1"}
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
            assert sse_ids(await read_until_seq(resp, 4)) == [2, 3, 4]
            await writer.step(5)
            assert sse_ids(await read_until_seq(resp, 5)) == [5]


async def test_sse_events_that_land_while_the_stream_opens_go_out_at_once(
    deployment: Deployment,
    db: asyncpg.Pool,
    tenant: Tenant,
    redis: Redis,
    sink: EventSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Opened right after the submit, the row (queued, seq 1) is the next event and the
    stream is not read; the running and terminal events published during that row read
    still follow at once, not at the next sweep (here an hour away)."""
    task_id = await insert_task(db, tenant, last_seq=1)
    writer = Writer(db, sink, task_id)
    async with gateway(deployment, subscription_check_s=3600) as gw:
        assert gw._deps is not None
        repository = gw._deps.repository
        task_row = repository.task_row

        async def racing(task: UUID, tenant_id: UUID) -> Any:
            row = await task_row(task, tenant_id)
            monkeypatch.setattr(repository, "task_row", task_row)  # only the first read
            await writer.step(2)
            await writer.step(3, TaskState.SUCCEEDED)
            [stream] = gw._streams
            await eventually(until(lambda: len(stream._live) == 2), what="both live events")
            return row

        monkeypatch.setattr(repository, "task_row", racing)
        path = await sse_path(gw, redis, tenant, task_id)
        status, body = await sse_get(gw.port, path, {"Last-Event-ID": "0"}, until_seq=3)
    assert status == 200 and sse_ids(body) == [1, 2, 3], body
    assert '"state":"succeeded"' in body and '"snapshot"' not in body, body
