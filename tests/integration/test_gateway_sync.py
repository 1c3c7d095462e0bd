"""What the browser client's syncs rely on, against the real gateway: it answers one
connection's frames in order, so after an unsubscribe, a subscribe for an id that is no
task is answered after the task's last frame of the subscription left and before the
first of the next subscribe's (longhaul-client.js, #settle)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from redis.asyncio import Redis

from shared.events import EventSink
from tests.conftest import Deployment, Tenant
from tests.integration.test_gateway_ws import (
    Writer,
    assert_no_gap,
    gateway,
    insert_task,
    recv_json,
    recv_until_seq,
    sink,  # noqa: F401 - the fixture
    ws_connect,
)

SYNC = "longhaul-client:sync:1"


async def test_a_sync_after_an_unsubscribe_parts_two_subscriptions_of_a_task(
    deployment: Deployment,
    db: asyncpg.Pool,
    tenant: Tenant,
    redis: Redis,
    sink: EventSink,  # noqa: F811 - the fixture
) -> None:
    """Events keep coming while the client leaves the task, syncs and follows it anew
    from 0: what precedes the sync's answer goes on the first subscription, what follows
    it is the second's replay from seq 1, with nothing of the first in between."""
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    total = 60

    async def write_all() -> None:
        for seq in range(1, total + 1):
            await writer.step(seq)
            await asyncio.sleep(0.005)

    # A grace far above a busy machine's loop lag: no snapshot stands in for a late write.
    async with (
        gateway(deployment, snapshot_grace_s=2) as gw,
        await ws_connect(gw, redis, tenant) as ws,
    ):
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 0}))
        writing = asyncio.create_task(write_all())
        first = await recv_until_seq(ws, task_id, 5)
        for frame in (
            {"op": "unsubscribe", "task_id": str(task_id)},
            {"op": "subscribe", "task_id": SYNC, "after_seq": 0},
            {"op": "subscribe", "task_id": str(task_id), "after_seq": 0},
        ):
            await ws.send(json.dumps(frame))
        while (frame := await recv_json(ws))["task_id"] != SYNC:
            first.append(frame)
        await writing
        second = await recv_until_seq(ws, task_id, total)
    assert frame == {
        "type": "error",
        "code": "not_found",
        "message": "no such task",
        "task_id": SYNC,
    }
    assert_no_gap(first, 0)
    assert_no_gap(second, 0)
    assert not any(f.get("snapshot") for f in first + second)
    events: list[dict[str, Any]] = [f for f in first if f["type"] == "event"]
    assert events[-1]["seq"] < total  # the first subscription was still live when it ended
