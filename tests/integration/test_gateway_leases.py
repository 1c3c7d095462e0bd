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
from shared.redis import create_client
from tests.conftest import Deployment, create_tenant
from tests.faults.private import PrivateRedis
from tests.integration.test_gateway_ws import gateway, insert_task, sse_get, sse_path
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
    place; renewed, leases outlive their length, and come back if Redis lost them; a
    holder that stops renewing loses them once they lapse; one that closes gives back
    what it holds."""
    tenant = uuid.uuid4()
    key = deployment.wire.tenant_connections(tenant)
    lease_s = timeout(2)
    one = Leases(redis, deployment.wire, cap=2, lease_s=lease_s)
    two = Leases(redis, deployment.wire, cap=2, lease_s=lease_s)
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
        await asyncio.sleep(lease_s * 1.5)
        assert await one.take(tenant) is None
        # ...and Redis losing them (a restart with no persistence) loses them only
        # until the next renewal.
        await redis.delete(key)
        await two.renew()
        assert await redis.zcard(key) == 2 and await one.take(tenant) is None
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
    # Their holder gone silent (no renewal, no drop), they lapse.
    taken = await eventually(lambda: one.take(tenant), within=10, what="a lapsed place")
    assert await redis.zcard(key) == 1  # the lapsed ones dropped by the take
    await one.aclose()  # gives back what it still holds
    assert await redis.zcard(key) == 0, taken


async def test_a_shorter_lease_elsewhere_cuts_no_lease_short(
    deployment: Deployment, redis: Redis
) -> None:
    """A gateway whose leases are shorter (its setting differs) does not shorten the
    life of the tenant's set, which holds the others' longer leases."""
    tenant = uuid.uuid4()
    long = Leases(redis, deployment.wire, cap=5, lease_s=30)
    short = Leases(redis, deployment.wire, cap=5, lease_s=0.2)
    assert await long.take(tenant) is not None
    lease = await short.take(tenant)
    assert lease is not None
    short.drop(lease)
    await short.aclose()
    await asyncio.sleep(0.5)
    assert await redis.zcard(deployment.wire.tenant_connections(tenant)) == 1
    await long.aclose()


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

        async def leases(count: int) -> bool:
            return bool(await redis.zcard(deployment.wire.tenant_connections(tenant.id)) == count)

        async def status(gw: Gateway) -> int:
            return await _ws_status(await ws_url(gw))

        ws = await connect(await ws_url(a))
        sse_url = f"http://127.0.0.1:{b.port}{await sse_path(b, redis, tenant, task_id)}"
        async with http.get(sse_url) as stream:
            assert stream.status == 200
            assert await status(a) == 429 and await status(b) == 429
            assert a.registry.connection_count == 1 and b.registry.connection_count == 1
            await ws.close()
            await eventually(lambda: leases(1), what="the WebSocket's lease given back")
            assert await status(b) == 101
        await eventually(lambda: leases(0), what="the stream's lease given back")
        async with asyncio.timeout(timeout(10)):
            assert [await status(a), await status(b)] == [101, 101]
        held = await connect(await ws_url(a))
    assert await redis.zcard(deployment.wire.tenant_connections(tenant.id)) == 0
    await held.close()


async def _ws_status(url: str) -> int:
    """101 for a WebSocket that opened (closed at once), else the refusal's status."""
    try:
        async with connect(url):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_a_refusal_at_the_tenant_cap_leaves_the_token_usable_once(
    deployment: Deployment, db: asyncpg.Pool, redis: Redis
) -> None:
    """At the tenant's cap a single-use token gets 429 and stays good: once a place is
    free, the same token opens a WebSocket (and an SSE stream), and then no more. Two
    opens at once with one token: one opens, the other gets 401."""
    tenant = await create_tenant(db)
    task_id = await insert_task(db, tenant)
    leases = deployment.wire.tenant_connections(tenant.id)
    async with gateway(deployment, max_connections_per_tenant=1) as gw:

        async def ws_token() -> str:
            token, _ = await wstokens.issue(redis, deployment.wire, tenant.id, 60)
            return f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}"

        held = await connect(await ws_token())
        url = await ws_token()
        path = await sse_path(gw, redis, tenant, task_id)
        assert await _ws_status(url) == 429
        assert (await sse_get(gw.port, path, {}))[0] == 429
        await held.close()
        await eventually(lambda: _count(redis, leases, 0), what="the place given back")
        assert await _ws_status(url) == 101
        await eventually(lambda: _count(redis, leases, 0), what="the place given back")
        assert await _ws_status(url) == 401
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{gw.port}{path}") as stream,
        ):
            assert stream.status == 200
        assert (await sse_get(gw.port, path, {}))[0] == 401

        await eventually(lambda: _count(redis, leases, 0), what="the place given back")
        url = await ws_token()
        assert sorted(await asyncio.gather(_ws_status(url), _ws_status(url))) == [101, 401]


async def _count(redis: Redis, key: str, count: int) -> bool:
    return bool(await redis.zcard(key) == count)


async def test_a_refusal_for_an_outage_after_the_token_was_read_gives_it_back(
    deployment: Deployment, db: asyncpg.Pool
) -> None:
    """The token store answers but taking a lease fails (a private Redis without
    EVALSHA): 503, and the token is still there for the retry."""
    tenant = await create_tenant(db)
    with PrivateRedis("--rename-command", "EVALSHA", '""') as server:
        client = create_client(server.url, 2)
        try:
            async with gateway(deployment, redis_url=server.url) as gw:
                token, _ = await wstokens.issue(client, gw.wire, tenant.id, 60)
                url = f"ws://127.0.0.1:{gw.port}/v1/ws?token={token}"
                assert await _ws_status(url) == 503
                assert await client.exists(gw.wire.ws_token(wstokens.token_hash(token))) == 1
        finally:
            await client.aclose()
