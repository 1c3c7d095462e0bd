"""Routes outside ``/v1`` (no auth): health, readiness, metrics, OpenAPI, the console."""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import web

from services.api.context import SERVICES
from services.api.openapi import build_openapi
from shared.health import METRICS_CONTENT_TYPE, metrics_text, readiness

CONSOLE_DIR = Path(__file__).parent / "console"
OPENAPI = web.AppKey("openapi", bytes)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]

    async def rabbitmq() -> None:
        if not svc.monitor.fresh(3.0):
            raise ConnectionError("no recent queue sample")

    ok, body = await readiness(
        {"postgresql": svc.repo.ping, "redis": svc.redis.ping, "rabbitmq": rabbitmq},
        svc.settings.io_timeout_s,
    )
    return web.json_response(body, status=200 if ok else 503)


async def metrics(_: web.Request) -> web.Response:
    return web.Response(body=metrics_text(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def console(_: web.Request) -> web.FileResponse:
    return web.FileResponse(CONSOLE_DIR / "index.html")


async def console_config(request: web.Request) -> web.Response:
    """What the console cannot know by itself: where the gateway is."""
    svc = request.app[SERVICES]
    return web.Response(
        body=orjson.dumps({"gateway_url": svc.settings.public_ws_url}),
        content_type="application/json",
    )


def add_routes(app: web.Application) -> None:
    # Relative: the API's bind address (0.0.0.0 in a container) is not where clients
    # reach it, and a proxy in front changes the host again.
    app[OPENAPI] = orjson.dumps(build_openapi("/"))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/", console)
    app.router.add_get("/console/config.json", console_config)
    if CONSOLE_DIR.is_dir():
        app.router.add_static("/console/", CONSOLE_DIR, follow_symlinks=False)
