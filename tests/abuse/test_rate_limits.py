"""Per-tenant rate limits from the outside (DESIGN promise 5): a tenant flooding at ten
times its limit gets 429 with Retry-After while another tenant is untouched, and a
tenant's own limit (stored with the tenant) overrides the deployment's default."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import orjson

from tests.abuse.conftest import MakeSystem, report
from tests.conftest import Deployment, Tenant, create_tenant

RATE = 20
BURST = 20
FLOOD_S = 2.0


async def _get(
    http: aiohttp.ClientSession, url: str, tenant: Tenant
) -> tuple[int, dict[str, Any], dict[str, str], float]:
    start = time.perf_counter()
    async with http.get(url, headers=tenant.headers) as r:
        body = orjson.loads(await r.read())
        return r.status, body, dict(r.headers), time.perf_counter() - start


async def _paced(
    http: aiohttp.ClientSession, url: str, tenant: Tenant, per_s: float, seconds: float
) -> list[tuple[int, dict[str, Any], dict[str, str], float]]:
    """Requests at about ``per_s`` for ``seconds``, sent in ticks of 50 ms."""
    tick = 0.05
    per_tick = per_s * tick
    owed = 0.0
    pending: list[asyncio.Task[Any]] = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        owed += per_tick
        while owed >= 1:
            owed -= 1
            pending.append(asyncio.create_task(_get(http, url, tenant)))
        await asyncio.sleep(tick)
    return list(await asyncio.gather(*pending))


def _assert_polite_429(body: dict[str, Any], headers: dict[str, str]) -> None:
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    assert body["status"] == 429 and body["type"].endswith("/rate-limited"), body
    retry = headers.get("Retry-After", "")
    assert retry.isdigit() and int(retry) >= 1, retry


async def test_flooding_tenant_gets_429_while_another_tenant_passes(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """Tenant A at 10x its 20/s limit gets 429s with Retry-After; tenant B at 5/s gets none."""
    system = systems(deployment)
    await system.start_api(rate_limit_per_s=str(RATE), rate_limit_burst=str(BURST))
    a, b = await create_tenant(db), await create_tenant(db)
    url = f"{system.api_url}/v1/tasks?limit=1"
    start = time.monotonic()
    flood, calm = await asyncio.gather(
        _paced(http, url, a, RATE * 10, FLOOD_S), _paced(http, url, b, 5, FLOOD_S)
    )
    elapsed = time.monotonic() - start
    ok = [r for r in flood if r[0] == 200]
    limited = [r for r in flood if r[0] == 429]
    print(
        f"tenant A: {len(flood)} requests in {elapsed:.2f}s -> {len(ok)} x 200, "
        f"{len(limited)} x 429; tenant B: {[r[0] for r in calm].count(200)}/{len(calm)} x 200"
    )
    assert len(ok) + len(limited) == len(flood), sorted({r[0] for r in flood})
    assert limited, "a tenant at 10x its limit was never limited"
    # What a token bucket can let through: the burst and the refill, with one second of
    # slack for the clock edges (this bounds a count, not a time).
    assert len(ok) <= BURST + RATE * (elapsed + 1), len(ok)
    for r in limited:
        _assert_polite_429(r[1], r[2])
    report("429 latency", [r[3] for r in limited])
    assert [r[0] for r in calm] == [200] * len(calm), [r[0] for r in calm]


async def test_limits_stored_with_the_tenant_override_the_default(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """tenants.rate_limit_per_s / rate_burst replace the deployment's limit, both ways."""
    system = systems(deployment)
    await system.start_api(rate_limit_per_s=str(RATE), rate_limit_burst=str(BURST))
    strict, generous = await create_tenant(db), await create_tenant(db)
    await db.execute(
        "UPDATE tenants SET rate_limit_per_s = 1, rate_burst = 3 WHERE id = $1", strict.id
    )
    await db.execute(
        "UPDATE tenants SET rate_limit_per_s = 1000, rate_burst = 200 WHERE id = $1", generous.id
    )
    url = f"{system.api_url}/v1/tasks?limit=1"
    start = time.monotonic()
    strict_statuses = [(await _get(http, url, strict))[0] for _ in range(10)]
    elapsed = time.monotonic() - start
    print(f"strict tenant (1/s, burst 3): {strict_statuses} in {elapsed:.2f}s")
    # 3 from the burst, then one a second: the default (burst 20) would pass all ten.
    # With one second of slack for the clock edges (this bounds a count, not a time).
    assert strict_statuses[:3] == [200] * 3
    assert strict_statuses.count(200) <= 3 + 1 * (elapsed + 1), strict_statuses
    assert strict_statuses[3] == 429 or elapsed > 1, strict_statuses
    burst = await asyncio.gather(*(_get(http, url, generous) for _ in range(100)))
    statuses = [r[0] for r in burst]
    print(f"generous tenant (1000/s, burst 200): {statuses.count(200)}/100 x 200")
    # The default burst (20) would have refused most of these.
    assert statuses == [200] * 100


async def test_batches_refused_as_bad_still_cost_the_tenant(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """A batch took its tokens only once its body was valid: malformed or invalid
    batches (each up to 1,000 items to check) were never limited."""
    system = systems(deployment)
    await system.start_api(rate_limit_per_s="1", rate_limit_burst="3")
    tenant = await create_tenant(db)
    url = f"{system.api_url}/v1/tasks:batch"
    statuses = []
    for _ in range(8):
        async with http.post(url, json={"tasks": [{"type": "no such type"}] * 10},
                             headers=tenant.headers) as r:  # fmt: skip
            statuses.append(r.status)
    print(f"invalid batches at 1/s, burst 3: {statuses}")
    assert statuses[:3] == [422] * 3
    assert 429 in statuses[3:], statuses
