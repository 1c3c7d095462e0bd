"""Revoking an API key ends the streams its tokens opened, WebSocket and SSE, within the
gateway's check period, against the real Redis and PostgreSQL; other keys' streams run
on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from uuid import UUID

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.frames import CloseCode

from services.ws_gateway import app
from services.ws_gateway.app import Gateway
from services.ws_gateway.repository import TaskRepository
from shared import keys, wstokens
from shared.events import EventSink
from tests.conftest import Deployment, Tenant, add_key, create_tenant
from tests.integration.test_gateway_ws import (
    Writer,
    gateway,
    insert_task,
    read_until_seq,
    recv_until_seq,
    sse_get,
)
from tests.support import eventually, timeout, until

CHECK_S = 1.0


async def _second_key(db: asyncpg.Pool, tenant: Tenant) -> str:
    """Another key of the same tenant; its id."""
    parsed = keys.parse(await add_key(db, tenant.id))
    assert parsed is not None
    return parsed.key_id


async def _ws(gw: Gateway, redis: Redis, tenant: Tenant, key_id: str) -> ClientConnection:
    """A WebSocket opened with a single-use token of ``key_id``."""
    token, _ = await wstokens.issue(redis, gw.wire, tenant.id, 60, key_id=key_id)
    return await connect(f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}")


async def _subscribed(ws: ClientConnection, task_id: UUID, seq: int) -> None:
    await ws.send(json.dumps({"op": "subscribe", "task_id": str(task_id), "after_seq": 0}))
    await recv_until_seq(ws, task_id, seq)


async def _closed(ws: ClientConnection) -> None:
    """Wait for the gateway to close the WebSocket. Only a check closes it, and the bound
    is loose on purpose: the test asserts that it ends, not how fast (no timings)."""
    async with asyncio.timeout(timeout(CHECK_S + 10)):
        await ws.wait_closed()


async def test_revoking_a_key_ends_its_open_streams_within_the_check_period(
    deployment: Deployment, db: asyncpg.Pool, redis: Redis
) -> None:
    """A WebSocket and an SSE stream of a key, open when the key is revoked, end within
    LONGHAUL_REVOCATION_CHECK_S: the WebSocket with 1008, the SSE stream with its last
    chunk, and the task token's reconnect gets 401. A WebSocket and an SSE stream of
    another key of the same tenant run on and get the next event."""
    tenant = await create_tenant(db)
    other_key = await _second_key(db, tenant)
    task_id = await insert_task(db, tenant)
    writer = Writer(db, EventSink(redis, deployment.wire, retention_s=600, maxlen=100), task_id)
    await writer.step(1)
    async with (
        gateway(deployment, revocation_check_s=CHECK_S) as gw,
        aiohttp.ClientSession() as http,
    ):
        paths = []
        for key_id in (tenant.key_id, other_key):
            token, _ = await wstokens.issue(
                redis, gw.wire, tenant.id, 60, key_id=key_id, task_id=task_id
            )
            paths.append(f"/v1/tasks/{task_id}/events?token={token}")
        mine_sse, theirs_sse = [
            await http.get(f"http://127.0.0.1:{gw.port}{path}") for path in paths
        ]
        mine_ws = await _ws(gw, redis, tenant, tenant.key_id)
        theirs_ws = await _ws(gw, redis, tenant, other_key)
        for ws in (mine_ws, theirs_ws):
            await _subscribed(ws, task_id, 1)
        for resp in (mine_sse, theirs_sse):
            assert (await read_until_seq(resp, 1)).count("id: 1\n") == 1
        assert gw.registry.connection_count == 4

        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", tenant.key_id)
        await _closed(mine_ws)
        assert mine_ws.close_code == CloseCode.POLICY_VIOLATION, mine_ws.close_code
        assert mine_ws.close_reason is not None and "revoked" in mine_ws.close_reason
        async with asyncio.timeout(timeout(10)):
            assert await mine_sse.content.read() == b""  # its end: raises on a cut stream
        status, body = await sse_get(gw.port, paths[0], {})
        assert status == 401 and "revoked" in body, body

        # Another period and more: the other key's streams are still served.
        await asyncio.sleep(2 * CHECK_S)
        await writer.step(2)
        await recv_until_seq(theirs_ws, task_id, 2)
        assert "id: 2\n" in await read_until_seq(theirs_sse, 2)
        assert gw.registry.connection_count == 2
        assert b"longhaul_gateway_revoked_total 2.0" in gw.metrics.render()
        await theirs_ws.close()
        theirs_sse.close()
        await eventually(until(lambda: gw.registry.connection_count == 0))


async def test_a_token_issued_before_the_revocation_is_refused_once_the_gateway_knows(
    deployment: Deployment, db: asyncpg.Pool, redis: Redis
) -> None:
    """A single-use token lives a minute: one the API issued just before its key was
    revoked is refused (401) at open once the gateway knows, from its check of an open
    stream of that key or, for a key it has not seen, by asking at the open."""
    tenant = await create_tenant(db)
    other_key = await _second_key(db, tenant)
    async with gateway(deployment, revocation_check_s=CHECK_S) as gw:
        ws = await _ws(gw, redis, tenant, tenant.key_id)
        late = [
            (await wstokens.issue(redis, gw.wire, tenant.id, 60, key_id=key_id))[0]
            for key_id in (tenant.key_id, other_key)
        ]
        await db.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = ANY($1::text[])",
            [tenant.key_id, other_key],
        )
        await _closed(ws)  # the check ran and saw the key revoked
        for token in late:
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}")
            assert refused.value.response.status_code == 401
            assert b"revoked" in refused.value.response.body
        assert gw.registry.connection_count == 0


class _CountingRepository(TaskRepository):
    """The gateway's repository, counting its reads of API keys."""

    key_reads = 0

    async def active_keys(self, key_ids: Sequence[str]) -> set[str]:
        type(self).key_reads += 1
        return await super().active_keys(key_ids)


async def test_reconnects_with_a_task_token_read_its_key_once_a_period(
    deployment: Deployment, db: asyncpg.Pool, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty (re)connects of a task token, ten at once and ten in turn, within one
    check period (an hour here): its key is read once, not at each."""
    monkeypatch.setattr(app, "TaskRepository", _CountingRepository)
    monkeypatch.setattr(_CountingRepository, "key_reads", 0)
    tenant = await create_tenant(db)
    task_id = await insert_task(db, tenant)
    async with (
        gateway(deployment, revocation_check_s=3600) as gw,
        aiohttp.ClientSession() as http,
    ):
        token, _ = await wstokens.issue(
            redis, gw.wire, tenant.id, 60, key_id=tenant.key_id, task_id=task_id
        )
        url = f"http://127.0.0.1:{gw.port}/v1/tasks/{task_id}/events?token={token}"

        async def reconnect() -> int:
            async with http.get(url) as stream:
                return stream.status

        assert await asyncio.gather(*(reconnect() for _ in range(10))) == [200] * 10
        assert [await reconnect() for _ in range(10)] == [200] * 10
    assert _CountingRepository.key_reads == 1
