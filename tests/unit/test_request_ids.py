"""An unexpected error's answer names the request, and the log line it wrote carries
the same id: the one thing a client can report that finds the line."""

from __future__ import annotations

import io
import logging

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.api.problems import problem_middleware
from services.api.requestids import request_id, request_id_middleware
from shared.logging import JsonFormatter


async def _broken(request: web.Request) -> web.Response:
    raise RuntimeError("a bug")


async def test_a_500_and_its_log_line_share_the_request_id() -> None:
    app = web.Application(middlewares=[request_id_middleware, problem_middleware])
    app.router.add_get("/broken", _broken)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("api"))
    logger = logging.getLogger("services.api.problems")
    logger.addHandler(handler)
    try:
        async with TestClient(TestServer(app)) as client, client.get("/broken") as r:
            assert r.status == 500
            body = await r.json()
            header = r.headers["X-Request-ID"]
    finally:
        logger.removeHandler(handler)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["unhandled error"]
    assert lines[0]["request_id"] == header == body["request_id"]
    assert "a bug" in lines[0]["exc"]


def test_only_plain_tokens_are_kept() -> None:
    assert request_id("req-1.2_3:4/5+6=7@8") == "req-1.2_3:4/5+6=7@8"
    for bad in (None, "", "x" * 129, "a b", "a\\tb", "é", "a;b", "<script>"):
        kept = request_id(bad)
        assert kept != bad and len(kept) == 32
