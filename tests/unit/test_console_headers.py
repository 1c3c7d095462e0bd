"""The console's files over HTTP: revalidated at every load (an upgrade is never mixed
with a cached older file), not sniffed, and under a policy that lets only the console's
own scripts run and talk only to the API and the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.api import ops

GATEWAY = "wss://live.example.com:8443/v1/ws"


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    ops.add_routes(app, GATEWAY)
    async with TestClient(TestServer(app)) as client:
        yield client


def _policy(header: str) -> dict[str, list[str]]:
    directives = (d.split() for d in header.split(";") if d.strip())
    return {name: values for name, *values in directives}


@pytest.mark.parametrize(
    "path", ["/", "/console/console.js", "/console/longhaul-client.js", "/console/console.css"]
)
async def test_console_files_are_revalidated_and_confined(
    client: TestClient[web.Request, web.Application], path: str
) -> None:
    async with client.get(path) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        policy = _policy(r.headers["Content-Security-Policy"])
        etag = r.headers["ETag"]
    assert policy["script-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'", "wss://live.example.com:8443"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["default-src"] == ["'none'"]
    # no-cache costs a revalidation, not the file: unchanged, it is a 304, same headers.
    async with client.get(path, headers={"If-None-Match": etag}) as r:
        assert r.status == 304
        assert r.headers["Cache-Control"] == "no-cache"
        assert "Content-Security-Policy" in r.headers


async def test_api_answers_get_no_console_policy(
    client: TestClient[web.Request, web.Application],
) -> None:
    async with client.get("/healthz") as r:
        assert r.status == 200
        assert "Content-Security-Policy" not in r.headers


@pytest.mark.parametrize(
    ("url", "connect"),
    [
        ("ws://127.0.0.1:8001/v1/ws", "'self' ws://127.0.0.1:8001"),
        ("ws://[::1]:8001/v1/ws", "'self' ws://[::1]:8001"),
        # Nothing that is not a plain ws(s) origin goes into the header.
        ("ws://user:secret@gw:8001/v1/ws", "'self'"),
        ("ws://gw; script-src *", "'self'"),
        ("http://gw:8001/v1/ws", "'self'"),
    ],
)
def test_the_policy_names_the_gateways_origin_only(url: str, connect: str) -> None:
    policy = _policy(ops.console_headers(url)["Content-Security-Policy"])
    assert " ".join(policy["connect-src"]) == connect
