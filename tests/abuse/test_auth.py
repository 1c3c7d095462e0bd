"""Authentication under abuse: a revoked key stops working within the auth cache's
lifetime, secrets are compared in constant time, WebSocket tokens are single-use and
expire, and no key, secret or token ever reaches a log line."""

from __future__ import annotations

import asyncio
import hmac
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from services.api.auth import Authenticator
from services.api.problems import ProblemException
from services.api.repository import Principal
from shared import keys, wstokens
from tests.abuse.conftest import TASKS_MODULE, MakeSystem, request
from tests.conftest import ROOT_ENV, Deployment, Tenant, create_tenant
from tests.support import ARTIFACTS, System, eventually, run_cli, timeout

# WebSocket tokens' TTL here: short, yet long enough for a busy machine to use one.
TOKEN_TTL_S = 2


async def _cli(deployment: Deployment, *args: str) -> str:
    code, out, err = await run_cli({**ROOT_ENV, **deployment.env()}, *args)
    assert code == 0, err
    return out


async def test_revoked_key_gets_401_within_the_auth_cache_lifetime(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession
) -> None:
    """`longhaul keys revoke` takes effect within LONGHAUL_AUTH_CACHE_S, and for good."""
    system = systems(deployment)
    await system.start_api(auth_cache_s="1", rate_limit_per_s="0")
    name = f"revoked-{deployment.run_id}-{time.monotonic_ns()}"
    key = (await _cli(deployment, "keys", "create", "--tenant", name)).strip().splitlines()[-1]
    parsed = keys.parse(key)
    assert parsed is not None
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{system.api_url}/v1/tasks"
    assert (await request(http, "GET", url, headers=headers))[0] == 200
    out = await _cli(deployment, "keys", "revoke", parsed.key_id)
    revoked_at = time.monotonic()
    assert parsed.key_id in out and parsed.secret not in out

    async def refused() -> bool:
        return (await request(http, "GET", url, headers=headers))[0] == 401

    await eventually(refused, within=10, interval=0.05, what="the revoked key to get 401")
    print(
        f"revoked key refused {time.monotonic() - revoked_at:.2f}s after revocation (auth cache 1s)"
    )
    for _ in range(5):
        status, body, hdrs = await request(
            http, "POST", url, json={"type": "demo.noop"}, headers=headers
        )
        assert status == 401 and hdrs["WWW-Authenticate"].startswith("Bearer")
        assert parsed.secret.encode() not in body


class _Repo:
    def __init__(self, secret_hash: bytes) -> None:
        self.secret_hash = secret_hash

    async def api_key(self, key_id: str) -> tuple[bytes, Principal]:
        return self.secret_hash, Principal(UUID(int=1), key_id, None, None)


async def test_secrets_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's check of a key goes through hmac.compare_digest of the stored hash,
    whether the secret is right, wrong by one character, or of another length."""
    real = hmac.compare_digest
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    # shared.keys calls hmac.compare_digest through the module: patch it there.
    monkeypatch.setattr(hmac, "compare_digest", spy)
    new = keys.generate("test")
    auth = Authenticator(_Repo(new.secret_hash), cache_s=0)  # type: ignore[arg-type]
    tampered = new.key[:-1] + ("A" if new.key[-1] != "A" else "B")

    async def attempt(key: str) -> bool:
        req = make_mocked_request("GET", "/v1/tasks", headers={"Authorization": f"Bearer {key}"})
        try:
            await auth.authenticate(req)
        except ProblemException as exc:
            assert exc.problem.status == 401
            return False
        return True

    assert await attempt(new.key)
    assert not await attempt(tampered)
    assert len(calls) == 2
    assert all(stored == new.secret_hash and len(given) == len(stored) for given, stored in calls)


async def _ws_token(
    http: aiohttp.ClientSession, system: System, tenant: Tenant, task_id: str | None = None
) -> dict[str, Any]:
    status, body, _ = await request(
        http,
        "POST",
        f"{system.api_url}/v1/ws-tokens",
        headers=tenant.headers,
        json=None if task_id is None else {"task_id": task_id},
    )
    assert status == 201, body
    result: dict[str, Any] = orjson.loads(body)
    return result


async def _ws_status(system: System, token: str) -> int:
    try:
        async with connect(f"ws://127.0.0.1:{system.gateway_port}/v1/ws?token={token}"):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_ws_tokens_are_single_use_and_expire(
    deployment: Deployment,
    systems: MakeSystem,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    redis: Redis,
) -> None:
    """A token from POST /v1/ws-tokens opens one stream (WebSocket or SSE), once, and
    none after its TTL."""
    system = systems(deployment)
    await system.start_api(ws_token_ttl_s=str(TOKEN_TTL_S), rate_limit_per_s="0")
    await system.start_gateway()
    issued = await _ws_token(http, system, tenant)
    # It names the key that asked for it: revoking that key ends its stream (the
    # gateway's tests).
    key = deployment.wire.ws_token(wstokens.token_hash(issued["token"]))
    assert wstokens.parse_grant((await redis.get(key)).decode(), task_token=False) == (
        wstokens.Grant(tenant.id, None, tenant.key_id)
    )
    expires = datetime.fromisoformat(issued["expires_at"].replace("Z", "+00:00"))
    left = (expires - datetime.now(UTC)).total_seconds()
    assert 0 < left <= TOKEN_TTL_S + 0.5, left
    assert await _ws_status(system, issued["token"]) == 101
    assert await _ws_status(system, issued["token"]) == 401
    # One spent on SSE (for an unknown task: still spent) cannot open a WebSocket.
    sse = (await _ws_token(http, system, tenant))["token"]
    status, _, _ = await request(
        http,
        "GET",
        f"http://127.0.0.1:{system.gateway_port}/v1/tasks/{UUID(int=7)}/events",
        headers={"Authorization": f"Bearer {sse}"},
    )
    assert status == 404
    assert await _ws_status(system, sse) == 401
    late = (await _ws_token(http, system, tenant))["token"]
    await asyncio.sleep(TOKEN_TTL_S + 0.5)  # past the TTL: the only way to test an expiry
    assert await _ws_status(system, late) == 401


async def _sse_status(http: aiohttp.ClientSession, system: System, task_id: str, token: str) -> int:
    """The status a task's SSE stream answers; an open stream is left at once."""
    url = f"http://127.0.0.1:{system.gateway_port}/v1/tasks/{task_id}/events?token={token}"
    async with http.get(url) as r:
        return r.status


async def test_task_tokens_open_their_tasks_stream_until_they_expire(
    deployment: Deployment,
    systems: MakeSystem,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    db: asyncpg.Pool,
    redis: Redis,
) -> None:
    """POST /v1/ws-tokens with a task_id gives a task token: that task's SSE stream, as
    often as asked, for LONGHAUL_TASK_TOKEN_TTL_S (its Redis key's TTL: the gateway's
    tests show an expired one refused); no other task's stream, no WebSocket. Only for
    a task of the tenant's own; a bad body is refused as any other, and a body without
    a task_id (or none at all, or an empty one) gives a single-use token as before."""
    system = systems(deployment)
    ttl_s = 900
    await system.start_api(task_token_ttl_s=str(ttl_s), rate_limit_per_s="0")
    await system.start_gateway()
    url = f"{system.api_url}/v1/tasks"
    ids = []
    for _ in range(2):
        status, body, _ = await request(
            http, "POST", url, json={"type": "demo.noop", "delay_s": 3600}, headers=tenant.headers
        )
        assert status == 202, body
        ids.append(orjson.loads(body)["id"])
    mine, other_task = ids
    issued = await _ws_token(http, system, tenant, mine)
    assert issued["task_id"] == mine and issued["token"].startswith("t."), issued
    expires = datetime.fromisoformat(issued["expires_at"].replace("Z", "+00:00"))
    assert ttl_s - 60 < (expires - datetime.now(UTC)).total_seconds() <= ttl_s
    token = issued["token"]
    key = deployment.wire.ws_token(wstokens.token_hash(token))
    assert ttl_s * 1000 - 60_000 < await redis.pttl(key) <= ttl_s * 1000
    # It names the key that asked for it: revoking that key ends it (the gateway's tests).
    assert wstokens.parse_grant((await redis.get(key)).decode(), task_token=True) == (
        wstokens.Grant(tenant.id, UUID(mine), tenant.key_id)
    )
    assert [await _sse_status(http, system, mine, token) for _ in range(3)] == [200] * 3
    assert await _sse_status(http, system, other_task, token) == 401
    assert await _ws_status(system, token) == 401

    stranger = await create_tenant(db)
    tokens_url = f"{system.api_url}/v1/ws-tokens"
    for body_, status_ in [
        ({"task_id": mine}, 404),  # another tenant's task: not found, as everywhere
        ({"task_id": str(UUID(int=7))}, 404),
        ({"task_id": "seven"}, 422),
        ({"task": mine}, 422),
    ]:
        status, body, _ = await request(
            http, "POST", tokens_url, json=body_, headers=stranger.headers
        )
        assert status == status_, (body_, status, body)
        assert orjson.loads(body)["status"] == status_
    status, _, _ = await request(
        http, "POST", tokens_url, data=b"task_id=1", headers=tenant.headers
    )
    assert status == 415
    for kw in ({"json": {}}, {"json": {"task_id": None}}, {"data": b""}):
        status, body, _ = await request(http, "POST", tokens_url, headers=tenant.headers, **kw)
        assert status == 201, (kw, body)
        single = orjson.loads(body)
        assert "task_id" not in single and not single["token"].startswith("t."), single
        assert await _sse_status(http, system, mine, single["token"]) == 200
        assert await _sse_status(http, system, mine, single["token"]) == 401
    # An empty body sent chunked, as JSON: no body either.
    host, port = urlsplit(system.api_url).netloc.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/ws-tokens HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {tenant.key}\r\n".encode()
        + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.read(), timeout(10))
    writer.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]


async def test_no_key_secret_or_token_is_ever_logged(
    deployment: Deployment, systems: MakeSystem, http: aiohttp.ClientSession, db: asyncpg.Pool
) -> None:
    """With every service at DEBUG, a session of submissions, tokens, WebSocket and SSE
    streams and bad keys leaves no key, secret or token in any log line."""
    system = systems(deployment, log_level="DEBUG")
    api = await system.start_api(rate_limit_per_s="0", auth_cache_s="0")
    worker = await system.start_worker("--tasks", TASKS_MODULE)
    gateway = await system.start_gateway()
    tenant = await create_tenant(db)
    parsed = keys.parse(tenant.key)
    assert parsed is not None
    wrong = keys.parse(keys.generate("test").key)
    assert wrong is not None
    wrong_secret = wrong.secret
    forged = f"lh_test_{parsed.key_id}_{wrong_secret}"
    other = await create_tenant(db)
    revoked = keys.parse(other.key)
    assert revoked is not None
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", revoked.key_id)
    secrets_: list[str] = [tenant.key, parsed.secret, forged, wrong_secret, other.key]

    url = f"{system.api_url}/v1/tasks"
    h = {**tenant.headers, "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}
    status, body, _ = await request(
        http, "POST", url, json={"type": "abuse.echo", "args": {"marker": "m"}}, headers=h
    )
    assert status == 202, body
    task_id = orjson.loads(body)["id"]
    status, _, _ = await request(
        http, "POST", f"{url}:batch", json={"tasks": [{"type": "demo.noop"}] * 3}, headers=h
    )
    assert status == 202
    status, _, _ = await request(
        http, "POST", url, json={"type": "demo.noop"}, headers={**h, "Idempotency-Key": "k-1"}
    )
    assert status == 202
    for bad in (forged, other.key, "lh_garbage", tenant.key + "x"):
        status, _, _ = await request(http, "GET", url, headers={"Authorization": f"Bearer {bad}"})
        assert status == 401
    tokens = [(await _ws_token(http, system, tenant))["token"] for _ in range(4)]
    secrets_ += tokens
    ws_url = f"ws://127.0.0.1:{system.gateway_port}/v1/ws"
    async with connect(f"{ws_url}?token={tokens[0]}") as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "task_id": task_id}).decode())
        async with asyncio.timeout(timeout(30)):
            while orjson.loads(await ws.recv()).get("state") != "succeeded":
                pass
    assert await _ws_status(system, tokens[0]) == 401  # reused
    sse = f"http://127.0.0.1:{system.gateway_port}/v1/tasks/{task_id}/events"
    status, _, _ = await request(http, "GET", f"{sse}?token={tokens[1]}")
    assert status == 200
    status, _, _ = await request(http, "GET", sse, headers={"Authorization": f"Bearer {tokens[2]}"})
    assert status == 200
    status, _, _ = await request(http, "GET", f"{sse}?token={tokens[2]}")  # reused
    assert status == 401
    assert await _ws_status(system, tokens[3] + "x") == 401
    secrets_.append(tokens[3] + "x")
    task_token = (await _ws_token(http, system, tenant, task_id))["token"]
    secrets_.append(task_token)
    for _ in range(2):
        status, _, _ = await request(http, "GET", f"{sse}?token={task_token}")
        assert status == 200

    for proc in (api, worker, gateway):
        proc.terminate()
    # Read after the processes exited, so every line they wrote is there.
    logs = {proc.name: proc.log_path.read_text(errors="replace") for proc in (api, worker, gateway)}
    assert all(logs.values()), "a service wrote no log at DEBUG"
    print("log lines scanned: " + ", ".join(f"{n}={len(t.splitlines())}" for n, t in logs.items()))
    for path in sorted((ARTIFACTS / "logs").glob("*")):
        logs[str(path)] = path.read_text(errors="replace")
    leaks = [
        (where, secret[:12] + "…", line[:200])
        for where, text in logs.items()
        for line in text.splitlines()
        for secret in secrets_
        if secret in line
    ]
    assert leaks == [], leaks
    # The scan looked at real DEBUG output of this scenario (its trace id is there).
    ours = "\n".join(logs[p.name] for p in (api, worker, gateway))
    assert '"level":"debug"' in ours and "ab" * 16 in ours
