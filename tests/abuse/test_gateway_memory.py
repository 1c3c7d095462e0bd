"""The gateway under a connection flood past its cap: every attempt is refused at the
handshake, memory stays flat, and the connections it holds keep working."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.abuse.conftest import MakeSystem, gather_limited, request
from tests.conftest import Deployment, create_tenant
from tests.support import eventually, timeout

CAP = 50
ATTEMPTS = 2000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_gateway_memory_stays_flat_under_refused_connection_flood(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """2000 handshakes over a cap of 50 all get 503; RSS before and after is printed
    (and bounded loosely); the 50 held connections still receive events."""
    system = systems(deployment)
    await system.start_api(rate_limit_per_s="0")
    gateway = await system.start_gateway(max_connections=str(CAP))
    tenant = await create_tenant(db)
    status, raw, _ = await request(
        http,
        "POST",
        f"{system.api_url}/v1/tasks",
        json={"type": "demo.noop", "delay_s": 3600},
        headers=tenant.headers,
    )
    assert status == 202
    task_id = orjson.loads(raw)["id"]
    ws_url = f"ws://127.0.0.1:{system.gateway_port}/v1/ws"

    async def open_one() -> ClientConnection:
        _, body, _ = await request(
            http, "POST", f"{system.api_url}/v1/ws-tokens", headers=tenant.headers
        )
        return await connect(f"{ws_url}?token={orjson.loads(body)['token']}")

    held = await gather_limited(10, [open_one] * CAP)
    rss_before = rss_kib(gateway.pid)

    async def attempt() -> int:
        try:
            async with connect(f"{ws_url}?token=none", open_timeout=timeout(10)):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    start = time.monotonic()
    statuses = await gather_limited(50, [attempt] * ATTEMPTS)
    elapsed = time.monotonic() - start
    rss_after = rss_kib(gateway.pid)
    print(
        f"gateway RSS: {rss_before} KiB with {CAP} connections, {rss_after} KiB after "
        f"{ATTEMPTS} refused handshakes in {elapsed:.1f}s "
        f"({(rss_after - rss_before) / ATTEMPTS:.2f} KiB per attempt)"
    )
    assert statuses == [503] * ATTEMPTS, sorted(set(statuses))
    # Loose on purpose: allocator arenas and caches grow on first use, which is not a
    # leak; a leak of per-attempt state (buffers, a connection object) would multiply.
    assert rss_after < 2 * rss_before, (rss_before, rss_after)

    # The held connections were never disturbed.
    for ws in held[:5]:
        await ws.send(orjson.dumps({"op": "subscribe", "task_id": task_id}).decode())
        async with asyncio.timeout(timeout(10)):
            assert orjson.loads(await ws.recv())["task_id"] == task_id
    await held[0].close()

    async def room_again() -> bool:
        try:
            held[0] = await open_one()
        except InvalidStatus:
            return False
        return True

    await eventually(room_again, within=10, what="a freed slot to be usable")
    for ws in held:
        await ws.close()
