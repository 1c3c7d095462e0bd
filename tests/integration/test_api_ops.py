"""The API's operational endpoints against real dependencies: /metrics, and /readyz
naming the dependency that is down (Redis here, a private instance: stopping the shared
one would disturb other runs)."""

from __future__ import annotations

import aiohttp

from tests.conftest import Isolated
from tests.faults.private import PrivateRedis
from tests.support import System, eventually


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
