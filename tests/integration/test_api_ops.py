"""The API's operational endpoints against real dependencies: /metrics, /readyz
naming the dependency that is down (Redis here, a private instance: stopping the shared
one would disturb other runs), and the request id every answer carries."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.conftest import Isolated
from tests.faults.private import PrivateRedis
from tests.support import System, eventually, timeout


async def test_readyz_names_the_dependency_down_and_metrics_are_served(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    with PrivateRedis() as redis_server:
        system = System(isolated.deployment.env(redis_url=redis_server.url, io_timeout_s="1"))
        try:
            await system.start_api()
            async with http.get(f"{system.api_url}/metrics") as r:
                text = await r.text()
            assert r.status == 200 and r.content_type == "text/plain"
            # The readiness checks start_api made are counted by route and status.
            assert (
                'longhaul_api_request_seconds_count{method="GET",route="/readyz",status="200"}'
                in text
            )
            assert "longhaul_api_queue_depth" in text
            async with http.get(f"{system.api_url}/readyz") as r:
                assert r.status == 200
                assert set((await r.json())["dependencies"].values()) == {"ok"}
            async with http.get(f"{system.api_url}/healthz") as r:
                assert r.status == 200
                # Each essential loop, by the seconds since its last beat.
                assert set((await r.json())["loops"]) == {"queue-monitor", "outbox-relay"}
            await _answers_carry_request_ids(http, system.api_url)
            redis_server.stop()

            async def unready() -> dict[str, str] | None:
                async with http.get(f"{system.api_url}/readyz") as r:
                    body = await r.json()
                    return body["dependencies"] if r.status == 503 else None

            deps = await eventually(unready, within=20, what="/readyz to say 503")
            assert deps["redis"].startswith("down"), deps
            assert deps["postgresql"] == "ok" and deps["rabbitmq"] == "ok", deps
        finally:
            system.stop()


async def test_readyz_answers_soon_with_a_hung_redis_down(
    isolated: Isolated, http: aiohttp.ClientSession, redis_server: PrivateRedis
) -> None:
    """A paused Redis accepts connections and never answers: /readyz says so within
    LONGHAUL_READY_TIMEOUT_S (2 s in the tests), not after LONGHAUL_IO_TIMEOUT_S (20 s
    here; it did), and probes meanwhile wait for the one ping in flight rather than add
    their own."""
    system = System(
        isolated.deployment.env(redis_url=redis_server.url, io_timeout_s="20", handoff_claim_s="60")
    )
    try:
        await system.start_api()
        redis_server.pause()
        try:
            for _ in range(3):
                async with asyncio.timeout(timeout(8)), http.get(f"{system.api_url}/readyz") as r:
                    assert r.status == 503
                    deps = (await r.json())["dependencies"]
                assert deps["redis"] == "down: TimeoutError", deps
                assert deps["postgresql"] == "ok", deps
        finally:
            redis_server.resume()

        async def ready() -> bool:
            async with http.get(f"{system.api_url}/readyz") as r:
                return r.status == 200

        await eventually(ready, within=10, what="/readyz to say 200 again")
    finally:
        system.stop()


async def _answers_carry_request_ids(http: aiohttp.ClientSession, api_url: str) -> None:
    """Every answer names its request: the caller's X-Request-ID when it is a plain
    token, else a new one; a problem carries it in its body too."""
    async with http.get(f"{api_url}/v1/tasks", headers={"X-Request-ID": "lb-7f3a:1"}) as r:
        assert r.status == 401
        assert r.headers["X-Request-ID"] == "lb-7f3a:1"
        assert (await r.json())["request_id"] == "lb-7f3a:1"
    async with http.get(f"{api_url}/healthz", headers={"X-Request-ID": "two words"}) as r:
        assert r.status == 200
        new = r.headers["X-Request-ID"]
    assert new != "two words" and len(new) == 32 and int(new, 16) >= 0
    async with http.get(f"{api_url}/healthz") as r:
        assert r.headers["X-Request-ID"] not in {new, ""}


async def test_a_stopping_api_says_not_ready_while_it_serves_on(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """With LONGHAUL_STOP_DELAY_S, SIGTERM makes /readyz answer 503 while requests are
    still served (a load balancer takes the API out of rotation before its port
    closes); a second SIGTERM ends the delay, and the API drains and exits 0."""
    system = System(isolated.deployment.env())
    try:
        # Far longer than the test: only the second signal ends it.
        api = await system.start_api(stop_delay_s="300")
        api.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> dict[str, str] | None:
            async with http.get(f"{system.api_url}/readyz") as r:
                return await r.json() if r.status == 503 else None

        assert await eventually(not_ready, within=5, what="/readyz to say 503") == {
            "status": "stopping"
        }
        async with http.get(
            f"{system.api_url}/v1/task-types", headers=isolated.tenant.headers
        ) as r:
            assert r.status == 200  # still serving
        api.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(api.proc.wait, timeout(60)) == 0
    finally:
        system.stop()
