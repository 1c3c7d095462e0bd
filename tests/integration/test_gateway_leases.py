"""A tenant's connection cap across gateway processes: the leases in the real Redis, and
two gateways sharing them."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import asyncpg
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from services.ws_gateway.app import Gateway
from services.ws_gateway.leases import Leases, _renewals
from shared import wstokens
from tests.conftest import Deployment, create_tenant
from tests.integration.test_gateway_ws import gateway, insert_task, sse_path, until
from tests.support import eventually, timeout


def test_renewals_go_a_thousand_members_a_call_at_most() -> None:
    members = {f"k{i}": [f"m{i}-{j}" for j in range(n)] for i, n in enumerate([3, 1500, 2])}
    calls = _renewals(members, 30_000)
    assert [len(args) - 1 - len(keys) for keys, args in calls] == [1000, 505]
    # Every member once, under its own key, with the count in front of each run.
    seen: dict[str, list[str]] = {}
    for keys, args in calls:
        assert args[0] == 30_000
        i = 1
        for key in keys:
            count = int(args[i])
            seen.setdefault(key, []).extend(str(a) for a in args[i + 1 : i + 1 + count])
            i += count + 1
        assert i == len(args)
    assert seen == members
    assert _renewals({}, 30_000) == []


async def test_leases_hold_a_cap_across_holders_until_dropped_or_lapsed(
    deployment: Deployment, redis: Redis
) -> None:
    """Two holders (two gateways) share a tenant's cap of 2. A dropped lease frees its
    place; so does one whose holder stops renewing it, once it lapses, and not before
    while it is renewed."""
    tenant = uuid.uuid4()
    one = Leases(redis, deployment.wire, cap=2, lease_s=0.6)
    two = Leases(redis, deployment.wire, cap=2, lease_s=0.6)
    first = await one.take(tenant)
    assert first is not None and await two.take(tenant) is not None
    assert await one.take(tenant) is None and await two.take(tenant) is None
    assert await one.take(uuid.uuid4()) is not None  # another tenant's cap
    one.drop(first)
    await one.aclose()
    assert await two.take(tenant) is not None  # the dropped place
    assert await one.take(tenant) is None

    # ``two`` holds both places now; renewed, they outlive their length...
    renewing = asyncio.create_task(two.run(), name="test-renew")
    try:
        await asyncio.sleep(1.0)
        assert await one.take(tenant) is None
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
    # ...and, their holder gone (no renewal, no drop), they lapse.
    await eventually(lambda: one.take(tenant), within=5, what="a lapsed lease's place")
    await redis.delete(deployment.wire.tenant_connections(tenant))


async def test_two_gateways_share_a_tenants_connection_cap(
    deployment: Deployment, db: asyncpg.Pool, redis: Redis
) -> None:
    """Cap 2 across two gateways: a WebSocket on one and an SSE stream on the other fill
    it, and each gateway then refuses the tenant (429), though each holds one; closing
    the WebSocket lets a connection in on the other gateway. Gateways that stop give
    their leases back at once. A tenant of its own: the cap counts all its connections."""
    tenant = await create_tenant(db)
    task_id = await insert_task(db, tenant)
    async with (
        gateway(deployment, max_connections_per_tenant=2) as a,
        gateway(deployment, max_connections_per_tenant=2) as b,
        aiohttp.ClientSession() as http,
    ):

        async def ws_url(gw: Gateway) -> str:
            token, _ = await wstokens.issue(redis, deployment.wire, tenant.id, 60)
            return f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}"

        async def status(gw: Gateway) -> int:
            try:
                async with connect(await ws_url(gw)):
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        ws = await connect(await ws_url(a))
        sse_url = f"http://127.0.0.1:{b.port}{await sse_path(b, redis, tenant, task_id)}"
        async with http.get(sse_url) as stream:
            assert stream.status == 200
            assert await status(a) == 429 and await status(b) == 429
            assert a.registry.connection_count == 1 and b.registry.connection_count == 1
            await ws.close()
            await eventually(
                until(lambda: a.registry.connection_count == 0), what="the WebSocket gone"
            )
            assert await status(b) == 101
        await eventually(until(lambda: b.registry.connection_count == 0), what="stream gone")
        async with asyncio.timeout(timeout(10)):
            assert [await status(a), await status(b)] == [101, 101]
        held = await connect(await ws_url(a))
    assert await redis.zcard(deployment.wire.tenant_connections(tenant.id)) == 0
    await held.close()
