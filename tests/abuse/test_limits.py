"""Every size and count limit refused with its status or close code, from the outside:
the API's body, batch, page and string limits, and the gateway's caps on subscriptions,
connections per tenant and per process, and the opening handshake's duration.

(Oversized WebSocket frames (1009), slow readers (1013) and bad tokens are covered
against the in-process gateway in tests/integration/test_gateway_ws.py.)"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.abuse.conftest import MakeSystem, request
from tests.conftest import Deployment, Tenant, create_tenant
from tests.support import System, eventually, timeout

MAX_BODY = 65536


async def test_api_size_and_count_limits(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    """Oversized bodies get 413 (declared or chunked), over-long lists and strings 422,
    absurd nesting 400, an oversized header a 4xx: never a 5xx, and the API lives on."""
    system = systems(deployment)
    await system.start_api(max_body_bytes=str(MAX_BODY), rate_limit_per_s="0")
    base = system.api_url
    auth = {**tenant.headers, "Content-Type": "application/json"}

    async def chunks(total: int):  # type: ignore[no-untyped-def]
        yield b'{"type": "demo.noop", "args": {"x": "'
        for _ in range(total // 8192):
            yield b"y" * 8192
        yield b'"}}'

    huge = 20 * 1024 * 1024
    start = time.perf_counter()
    status, body, _ = await request(
        http, "POST", f"{base}/v1/tasks", data=b"x" * huge, headers=auth
    )
    print(f"413 for a {huge >> 20} MiB body in {(time.perf_counter() - start) * 1000:.0f}ms")
    assert status == 413 and orjson.loads(body)["status"] == 413
    status, body, _ = await request(
        http, "POST", f"{base}/v1/tasks", data=chunks(MAX_BODY * 4), headers=auth
    )
    assert status == 413, body  # no Content-Length: refused while reading

    cases: list[tuple[int, str, str, dict[str, Any]]] = [
        (422, "POST", "/v1/tasks:batch", {"json": {"tasks": [{"type": "demo.noop"}] * 1001}}),
        (422, "POST", "/v1/tasks", {"json": {"type": "t" * 129}}),
        (422, "POST", "/v1/tasks", {"json": {"type": "demo.noop", "delay_s": 1e308}}),
        (422, "POST", "/v1/tasks", {"json": {"type": "demo.noop", "priority": 2**70}}),
        (422, "POST", "/v1/tasks", {"json": {"type": "demo.noop", "max_attempts": True}}),
        (422, "POST", "/v1/tasks", {"json": {"type": "demo.noop", "priority": "3"}}),
        (404, "GET", "/v1/nothing-here", {}),
        (405, "DELETE", "/v1/tasks", {}),
        (400, "POST", "/v1/tasks", {"data": b"[" * 30_000 + b"]" * 30_000}),
        (422, "GET", "/v1/tasks?limit=501", {}),
        (422, "GET", "/v1/tasks?limit=0", {}),
        (422, "GET", "/v1/tasks?limit=99999999999999999999999", {}),
        (422, "GET", "/v1/tasks?limit=1_0", {}),
        (422, "GET", "/v1/tasks?limit=%D9%A3", {}),
        (422, "GET", f"/v1/tasks?type={'t' * 129}", {}),
        (422, "GET", f"/v1/tasks?cursor={'A' * 4000}", {}),
        (422, "GET", "/v1/dead-letters?limit=501", {}),
    ]
    for expected, method, path, kw in cases:
        status, body, headers = await request(
            http,
            method,
            f"{base}{path}",
            headers=auth if "json" not in kw else tenant.headers,
            **kw,
        )
        assert status == expected, (path, status, body[:300])
        assert headers["Content-Type"].startswith("application/problem+json"), path
        assert orjson.loads(body)["status"] == expected
        assert orjson.loads(body)["detail"], (path, body[:300])

    # Deep nesting that is valid JSON: a recursive walk, an idempotency fingerprint or
    # the answer (args sit a few levels down in it) failed past their own limits.
    def nested(depth: int, leaf: Any) -> Any:
        for _ in range(depth):
            leaf = [leaf]
        return leaf

    for depth, leaf, extra in (
        (990, "\x00", {}),
        (260, 1, {"Idempotency-Key": "deep-1"}),
        (65, 1, {}),
    ):
        body_ = {"type": "demo.fail", "args": {"message": nested(depth, leaf)}}
        status, body, _ = await request(
            http, "POST", f"{base}/v1/tasks", json=body_, headers={**tenant.headers, **extra}
        )
        assert status == 422 and b"nests arrays and objects" in body, (depth, status, body[:300])
    status, body, _ = await request(
        http, "GET", f"{base}/v1/tasks", headers={**tenant.headers, "X-Junk": "j" * 20_000}
    )
    assert 400 <= status < 500, (status, body[:200])
    status, _, _ = await request(http, "GET", f"{base}/v1/tasks", headers=tenant.headers)
    assert status == 200


# ---------------------------------------------------------------- gateway caps


async def _token(http: aiohttp.ClientSession, system: System, tenant: Tenant) -> str:
    async with http.post(f"{system.api_url}/v1/ws-tokens", headers=tenant.headers) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["token"])


async def _ws(http: aiohttp.ClientSession, system: System, tenant: Tenant) -> ClientConnection:
    token = await _token(http, system, tenant)
    return await connect(f"ws://127.0.0.1:{system.gateway_port}/v1/ws?token={token}")


async def _refused(
    http: aiohttp.ClientSession, system: System, tenant: Tenant
) -> tuple[int, str, dict[str, Any]]:
    """Status, Retry-After and problem body of a refused handshake."""
    with pytest.raises(InvalidStatus) as info:
        await _ws(http, system, tenant)
    response = info.value.response
    retry = response.headers.get("Retry-After", "")
    return response.status_code, retry, orjson.loads(response.body or b"{}")


async def _recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(timeout(10)):
        frame: dict[str, Any] = orjson.loads(await ws.recv())
        return frame


async def test_gateway_caps_subscriptions_connections_and_handshakes(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """Over the subscription cap: an error frame, the connection stays; over the tenant's
    and the process's connection caps: 429 and 503 at the handshake; a silent TCP client
    is dropped after the handshake timeout."""
    system = systems(deployment)
    await system.start_api(rate_limit_per_s="0")
    await system.start_gateway(
        max_subscriptions_per_connection="3",
        max_connections_per_tenant="2",
        max_connections="3",
        handshake_timeout_s="1",
    )
    a, b = await create_tenant(db), await create_tenant(db)
    async with http.post(
        f"{system.api_url}/v1/tasks:batch",
        json={"tasks": [{"type": "demo.noop", "delay_s": 3600}] * 4},
        headers=a.headers,
    ) as r:
        assert r.status == 202
        ids = [t["id"] for t in (await r.json())["tasks"]]

    # Subscriptions: the fourth is refused with a documented error frame; the
    # connection stays usable, and unsubscribing makes room again.
    ws_a1 = await _ws(http, system, a)
    for task_id in ids[:3]:
        await ws_a1.send(orjson.dumps({"op": "subscribe", "task_id": task_id}).decode())
        assert (await _recv(ws_a1))["seq"] == 1  # the queued event
    await ws_a1.send(orjson.dumps({"op": "subscribe", "task_id": ids[3]}).decode())
    refused = await _recv(ws_a1)
    assert refused["type"] == "error" and refused["code"] == "too_many_subscriptions", refused
    assert refused["task_id"] == ids[3]
    await ws_a1.send(orjson.dumps({"op": "unsubscribe", "task_id": ids[0]}).decode())
    await ws_a1.send(orjson.dumps({"op": "subscribe", "task_id": ids[3]}).decode())
    assert (await _recv(ws_a1))["task_id"] == ids[3]

    # Connections: two per tenant, three per process.
    ws_a2 = await _ws(http, system, a)
    status, retry, body = await _refused(http, system, a)
    assert status == 429 and retry.isdigit() and body["status"] == 429, (status, body)
    ws_b1 = await _ws(http, system, b)
    status, retry, body = await _refused(http, system, b)
    assert status == 503 and retry.isdigit() and body["status"] == 503, (status, body)
    await ws_a2.close()

    async def b_gets_in() -> bool:
        try:
            ws = await _ws(http, system, b)
        except InvalidStatus:
            return False
        await ws.close()
        return True

    await eventually(b_gets_in, within=10, what="a freed slot to be usable again")

    # Handshake timeout: a client that connects and sends nothing, and one that
    # dribbles a request line, are both dropped.
    async def dropped_after(payload: bytes) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", system.gateway_port)
        start = time.monotonic()
        if payload:
            writer.write(payload)
        async with asyncio.timeout(timeout(15)):
            rest = await reader.read()
        writer.close()
        assert b"101 Switching" not in rest
        return time.monotonic() - start

    silent, partial = await asyncio.gather(
        dropped_after(b""), dropped_after(b"GET /v1/ws?token=x HTTP/1.1\r\nHost: a\r\n")
    )
    print(
        f"handshake timeout 1s: silent client dropped after {silent:.2f}s, "
        f"partial request after {partial:.2f}s"
    )
    # The open connections were never disturbed.
    await ws_a1.send(orjson.dumps({"op": "subscribe", "task_id": ids[0]}).decode())
    assert (await _recv(ws_a1))["task_id"] == ids[0]
    for ws in (ws_a1, ws_b1):
        await ws.close()
