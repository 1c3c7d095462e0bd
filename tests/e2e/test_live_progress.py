"""Live progress end to end: api, worker and gateway as processes, a real WebSocket
client, tasks run by the worker. Per task and connection: strictly increasing seqs with
no gap and no duplicate, ending in the terminal event."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import UUID

import aiohttp
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import Deployment, Tenant
from tests.faults.private import PrivateRedis
from tests.support import System, eventually, timeout

TERMINAL = {"succeeded", "failed", "cancelled"}


async def _token(http: aiohttp.ClientSession, system: System, tenant: Tenant) -> str:
    async with http.post(f"{system.api_url}/v1/ws-tokens", headers=tenant.headers) as r:
        assert r.status == 201
        return str((await r.json())["token"])


async def _ws(http: aiohttp.ClientSession, system: System, tenant: Tenant) -> ClientConnection:
    token = await _token(http, system, tenant)
    return await connect(
        f"ws://127.0.0.1:{system.gateway_port}/v1/ws?token={token}", origin="http://127.0.0.1:8000"
    )  # type: ignore[arg-type]


async def _submit(
    http: aiohttp.ClientSession, system: System, tenant: Tenant, tasks: list[dict[str, Any]]
) -> list[str]:
    async with http.post(
        f"{system.api_url}/v1/tasks:batch", json={"tasks": tasks}, headers=tenant.headers
    ) as r:
        assert r.status == 202, await r.text()
        return [t["id"] for t in (await r.json())["tasks"]]


async def _collect(
    ws: ClientConnection, ids: set[str], within: float = 60.0
) -> dict[str, list[dict[str, Any]]]:
    """Every event frame per task until each of ``ids`` has its terminal event."""
    frames: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    pending = set(ids)
    async with asyncio.timeout(timeout(within)):
        while pending:
            frame = json.loads(await ws.recv())
            assert frame["type"] == "event", frame
            frames[frame["task_id"]].append(frame)
            if frame["state"] in TERMINAL:
                pending.discard(frame["task_id"])
    return frames


def _assert_story(events: list[dict[str, Any]], after: int = 0) -> None:
    """Seqs grow by one from ``after`` (a snapshot may stand for a lost stretch)."""
    seqs = [e["seq"] for e in events]
    assert len(seqs) == len(set(seqs)), f"duplicates: {seqs}"
    expected = after
    for event in events:
        if event.get("snapshot"):
            assert event["seq"] > expected
        else:
            assert event["seq"] == expected + 1, f"gap or disorder: {seqs}"
        expected = event["seq"]
    assert events[-1]["state"] == "succeeded"


async def test_fifty_tasks_on_one_connection_resume_and_late_subscribe(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    """50 tasks stream in order on one socket; a resume mid-way and a late subscriber
    get exactly what they lack; a finished task yields its terminal event at once."""
    await system.start_api()
    await system.start_worker(worker_concurrency="50")
    # A subscribe that reads a row whose newest event is still on its way waits for it
    # this long before it sends a snapshot: far above a busy machine's delays here.
    await system.start_gateway(snapshot_grace_s="2")
    ids = await _submit(
        http, system, tenant, [{"type": "demo.sleep", "args": {"seconds": 1.0, "steps": 5}}] * 50
    )
    async with await _ws(http, system, tenant) as ws:
        for task_id in ids:
            await ws.send(json.dumps({"op": "subscribe", "task_id": task_id, "after_seq": 0}))
        frames = await _collect(ws, set(ids))
    for task_id in ids:
        _assert_story(frames[task_id])
        assert not any(e.get("snapshot") for e in frames[task_id])
        # queued, running, 5 reports, succeeded: every event, none coalesced at 5/s.
        assert [e["seq"] for e in frames[task_id]] == list(range(1, 9))

    # Resume mid-way: a client that saw seq 1..3 of a task gets 4.. and nothing else.
    [again] = await _submit(
        http, system, tenant, [{"type": "demo.sleep", "args": {"seconds": 1.0, "steps": 5}}]
    )
    async with await _ws(http, system, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": again, "after_seq": 0}))
        first = [json.loads(await ws.recv()) for _ in range(3)]
    assert [e["seq"] for e in first] == [1, 2, 3]
    async with await _ws(http, system, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": again, "after_seq": 3}))
        rest = (await _collect(ws, {again}))[again]
    _assert_story(first + rest)

    # Subscribing after completion: the terminal event at once, from the stream.
    async with await _ws(http, system, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": ids[0], "after_seq": 7}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout(10)))
    assert frame["seq"] == 8 and frame["state"] == "succeeded"


async def test_every_frame_carries_the_trace_of_the_submitting_request(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    redis: Redis,
    deployment: Deployment,
) -> None:
    """One trace from the HTTP request to the WebSocket frame: the ``traceparent`` of
    the POST reaches the Task object and every event of the task, live, replayed and as
    a snapshot."""
    await system.start_api()
    await system.start_worker()
    await system.start_gateway()
    trace = "5e" * 16
    headers = {**tenant.headers, "traceparent": f"00-{trace}-{'0a' * 8}-01"}
    body = {"type": "demo.sleep", "args": {"seconds": 0.3, "steps": 3}, "timeout_s": 30}
    async with http.post(f"{system.api_url}/v1/tasks", json=body, headers=headers) as r:
        assert r.status == 202, await r.text()
        accepted = await r.json()
    task_id = accepted["id"]
    assert (accepted["trace_id"], accepted["timeout_s"]) == (trace, 30.0), accepted
    async with await _ws(http, system, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": task_id}))
        live = (await _collect(ws, {task_id}))[task_id]
    _assert_story(live)
    # The stream gone (expired): a later subscriber gets the row as a snapshot.
    await redis.delete(deployment.wire.event_stream(UUID(task_id)))
    async with await _ws(http, system, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": task_id}))
        snapshot = (await _collect(ws, {task_id}))[task_id]
    assert snapshot[-1].get("snapshot") is True
    assert {f.get("trace_id") for f in live + snapshot} == {trace}


async def test_redis_restart_mid_task_still_ends_in_the_terminal_event(
    deployment: Deployment, ports: dict[str, str], http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    """With every service on a private Redis that restarts (empty) mid-task, the client's
    stream still ends in the terminal event: from the stream, or a snapshot from the DB."""
    with PrivateRedis() as server:
        system = System(deployment.env(redis_url=server.url), ports)
        try:
            await system.start_api()
            await system.start_worker()
            await system.start_gateway()
            [task_id] = await _submit(
                http, system, tenant, [{"type": "demo.sleep", "args": {"seconds": 4, "steps": 8}}]
            )
            ws = await _ws(http, system, tenant)
            await ws.send(json.dumps({"op": "subscribe", "task_id": task_id, "after_seq": 0}))
            seen = [json.loads(await ws.recv()) for _ in range(3)]
            server.stop()
            # Redis is down: the task goes on (PostgreSQL is the truth).
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)  # the client's WebSocket is on this loop
            seen += (await _collect(ws, {task_id}, within=60))[task_id]
            await ws.close()
        finally:
            system.stop()
    _assert_story(seen)
    assert [e["seq"] for e in seen][:3] == [1, 2, 3]


async def test_a_live_client_gets_the_terminal_event_a_crashed_worker_never_wrote(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    """The worker commits the outcome and dies before writing its event to Redis; the
    redelivery finds the task finished, has nothing to run, and writes the terminal
    event the dead worker did not. A client that watched the task live gets it at once.
    (The gateway's sweep would too, later: it is off here, tested on its own.)"""
    await system.start_api()
    await system.start_gateway(subscription_check_s="600")
    crashing = await system.start_worker(failpoints="worker.after_commit=crash")
    [task_id] = await _submit(
        http, system, tenant, [{"type": "demo.sleep", "args": {"seconds": 1.0, "steps": 1}}]
    )
    async with await _ws(http, system, tenant) as ws:
        await ws.send(json.dumps({"op": "subscribe", "task_id": task_id, "after_seq": 0}))
        await eventually(lambda: _dead(crashing), within=30, what="the worker to crash")
        # The redelivery goes to a healthy worker, which skips the finished task.
        await system.start_worker()
        frames = (await _collect(ws, {task_id}, within=30))[task_id]
    assert frames[-1]["state"] == "succeeded", frames
    _assert_story(frames)


async def _dead(proc: Any) -> bool:
    return not proc.alive()
