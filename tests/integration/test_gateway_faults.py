"""The gateway through faults: kill -9 and restart of the gateway process, SIGTERM,
and a restart of (a private) Redis under a running gateway."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.ws_gateway.app import Gateway
from shared import wstokens
from shared.events import EventSink
from shared.redis import create_client
from tests.conftest import Deployment, Tenant
from tests.faults.private import PrivateRedis
from tests.integration.test_gateway_ws import (
    Writer,
    assert_no_gap,
    gateway_settings,
    insert_task,
    read_until_seq,
    recv_json,
    recv_until_seq,
)
from tests.support import eventually, free_port, running, timeout, until


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """Status and body of a plain GET to the gateway; status 0 when nothing listens."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, b""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def http_ok(port: int, path: str = "/healthz") -> bool:
    return (await http_get(port, path))[0] == 200


async def test_kill9_and_restart_resumes_without_gap(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis
) -> None:
    """After the gateway is killed and restarted, a client resumes from its last seq."""
    sink = EventSink(redis, deployment.wire, retention_s=600, maxlen=10_000)
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    port = free_port()
    # Writes race with the subscribes: a grace far above a busy machine's loop lag, so
    # a commit whose event is on its way is waited for, not taken for a lost stretch.
    env = deployment.env(gateway_port=str(port), snapshot_grace_s="2")
    seen: list[dict[str, Any]] = []
    with running("services.ws_gateway", env, name="gateway-a") as first:
        await eventually(lambda: http_ok(port), what="gateway up")
        token, _ = await wstokens.issue(redis, deployment.wire, tenant.id, 60)
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}")
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
        for seq in range(1, 6):
            await writer.step(seq)
        seen += await recv_until_seq(ws, task_id, 5)
        first.kill9()
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
    # Events keep coming while no gateway runs.
    for seq in range(6, 9):
        await writer.step(seq)
    with running("services.ws_gateway", env, name="gateway-b"):
        await eventually(lambda: http_ok(port), what="gateway back")
        token, _ = await wstokens.issue(redis, deployment.wire, tenant.id, 60)
        async with connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}") as ws2:
            await ws2.send(
                json.dumps(
                    {"op": "subscribe", "task_id": str(task_id), "after_seq": seen[-1]["seq"]}
                )
            )
            for seq in range(9, 11):
                await writer.step(seq)
            seen += await recv_until_seq(ws2, task_id, 10)
    assert_no_gap(seen, 0)
    assert not any(f.get("snapshot") for f in seen)


@pytest.mark.parametrize("stop_delay_s", ["0", "1"])
async def test_sigterm_closes_clients_with_1001(
    deployment: Deployment, tenant: Tenant, redis: Redis, stop_delay_s: str
) -> None:
    """A stopping gateway says "going away" and exits 0: at once, or once its stop
    delay has run out."""
    port = free_port()
    env = deployment.env(gateway_port=str(port), stop_delay_s=stop_delay_s)
    with running("services.ws_gateway", env) as proc:
        await eventually(lambda: http_ok(port), what="gateway up")
        token, _ = await wstokens.issue(redis, deployment.wire, tenant.id, 60)
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}")
        code = await asyncio.to_thread(proc.terminate)
        with pytest.raises(ConnectionClosed) as info:
            await recv_json(ws)
    assert code == 0, proc.output()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_a_stopping_gateway_serves_on_through_its_stop_delay(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant, redis: Redis
) -> None:
    """With LONGHAUL_STOP_DELAY_S, SIGTERM makes /readyz answer 503 "stopping" while an
    open WebSocket keeps getting events and new WebSocket and SSE clients are let in; a
    second SIGTERM ends the delay, and the gateway closes its clients with 1001, ends
    the SSE stream and exits 0."""
    sink = EventSink(redis, deployment.wire, retention_s=600, maxlen=10_000)
    task_id = await insert_task(db, tenant)
    writer = Writer(db, sink, task_id)
    port = free_port()
    # Far longer than the test: only the second signal ends it.
    env = deployment.env(gateway_port=str(port), stop_delay_s="300")

    async def ws_after(seq: int) -> ClientConnection:
        token, _ = await wstokens.issue(redis, deployment.wire, tenant.id, 60)
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}")
        await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": seq}))
        return ws

    async def stopping() -> Any:
        status, body = await http_get(port, "/readyz")
        return json.loads(body) if status == 503 else None

    with running("services.ws_gateway", env) as proc:
        await eventually(lambda: http_ok(port, "/readyz"), what="gateway ready")
        first = await ws_after(0)
        await writer.step(1)
        await recv_until_seq(first, task_id, 1)
        proc.proc.send_signal(signal.SIGTERM)
        assert await eventually(stopping, within=10, what="/readyz to say stopping") == {
            "status": "stopping"
        }
        await writer.step(2)
        assert (await recv_until_seq(first, task_id, 2))[-1]["seq"] == 2
        second = await ws_after(1)  # a client the balancer sent before it noticed
        assert [f["seq"] for f in await recv_until_seq(second, task_id, 2)] == [2]
        token, _ = await wstokens.issue(redis, deployment.wire, tenant.id, 60)
        url = f"http://127.0.0.1:{port}/v1/tasks/{task_id}/events?token={token}"
        async with aiohttp.ClientSession() as http, http.get(url) as sse:
            assert sse.status == 200
            assert "id: 2\n" in await read_until_seq(sse, 2)
            proc.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.proc.wait, timeout(60))
            async with asyncio.timeout(timeout(5)):
                assert await sse.content.read() == b""  # ended, not cut: raises on a cut
        closes = []
        for ws in (first, second):
            with pytest.raises(ConnectionClosed) as info:
                await recv_json(ws)
            closes.append(info.value.rcvd.code if info.value.rcvd is not None else None)
    assert code == 0, proc.output()
    assert closes == [1001, 1001]
    assert "no setting reads" not in proc.output()


# ---------------------------------------------------------------- private Redis


async def test_subscription_survives_redis_restart(
    deployment: Deployment, db: asyncpg.Pool, tenant: Tenant
) -> None:
    """After Redis restarts (losing everything), the hub resubscribes by itself, events
    committed meanwhile arrive as a snapshot, and live relay goes on without a gap."""
    with PrivateRedis() as server:
        url = server.url
        gw = Gateway(gateway_settings(deployment, redis_url=url, io_timeout_s=2))
        async with gw.start():
            # The retrying client every service uses: it rides out the restart.
            client = create_client(url, 2)
            sink = EventSink(client, deployment.wire, retention_s=600, maxlen=10_000)
            task_id = await insert_task(db, tenant)
            writer = Writer(db, sink, task_id)
            token, _ = await wstokens.issue(client, gw.wire, tenant.id, 60)
            async with connect(f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}") as ws:
                await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id)}))
                await eventually(until(lambda: gw.registry.subscription_count == 1))
                await writer.step(1)
                got = await recv_until_seq(ws, task_id, 1)
                assert gw.hub is not None
                server.stop()
                await eventually(
                    until(lambda: not gw.hub.connected.is_set()), what="hub notices Redis is gone"
                )
                # Redis cannot tell whether a token is good: try again, not 401.
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(f"ws://127.0.0.1:{gw.port}/v1/ws?token=any"):
                        pass
                assert refused.value.response.status_code == 503
                assert refused.value.response.headers["Retry-After"] == "1"
                status, _ = await http_get(gw.port, f"/v1/tasks/{task_id}/events?token=any")
                assert status == 503
                status, body = await http_get(gw.port, "/readyz")
                deps = json.loads(body)["dependencies"]
                assert status == 503 and deps["postgresql"] == "ok", body
                assert deps["redis"].startswith("down") and deps["redis_pubsub"].startswith("down")
                # Committed while Redis is down: the event itself is lost.
                await writer.step(2, emit=False)
                # Not started on the loop: the gateway in this process must run meanwhile.
                await asyncio.to_thread(server.start)
                await eventually(
                    until(lambda: gw.hub.generation >= 2),
                    within=timeout(20),
                    what="hub resubscribed",
                )
                await eventually(lambda: http_ok(gw.port, "/readyz"), what="ready again")
                got += await recv_until_seq(ws, task_id, 2)
                for seq in range(3, 6):
                    await writer.step(seq)
                got += await recv_until_seq(ws, task_id, 5)
                await client.aclose()
    assert_no_gap(got, 0)
    assert [f.get("snapshot", False) for f in got] == [False, True, False, False, False]
