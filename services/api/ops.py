"""Routes outside ``/v1`` (no auth): health, readiness, metrics, OpenAPI, the console."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from services.api.context import SERVICES, Services
from services.api.openapi import build_openapi
from shared.health import METRICS_CONTENT_TYPE, Readiness, metrics_text
from shared.liveness import Liveness

CONSOLE_DIR = Path(__file__).parent / "console"
OPENAPI = web.AppKey("openapi", bytes)
CONSOLE_HEADERS = web.AppKey("console_headers", Mapping[str, str])
READINESS = web.AppKey("readiness", Readiness)
LIVENESS = web.AppKey("liveness", Liveness)
# A host[:port] fit to stand in a header: no userinfo, no spaces or semicolons.
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


async def healthz(request: web.Request) -> web.Response:
    liveness = request.app.get(LIVENESS)
    if liveness is None:  # an app a test built without its loops
        return web.json_response({"status": "ok"})
    ok, body = liveness.report()
    return web.json_response(body, status=200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    if request.app[SERVICES].stopping():
        # Taken out of rotation while it serves on (LONGHAUL_STOP_DELAY_S).
        return web.json_response({"status": "stopping"}, status=503)
    ok, body = await request.app[READINESS]()
    return web.json_response(body, status=200 if ok else 503)


def add_readiness(app: web.Application, svc: Services) -> None:
    """What /readyz checks, kept for the app's life: a check in flight outlives a probe."""

    async def rabbitmq() -> None:
        if not svc.monitor.fresh(3.0):
            raise ConnectionError("no recent queue sample")

    app[READINESS] = Readiness(
        {"postgresql": svc.repo.ping, "redis": svc.redis.ping, "rabbitmq": rabbitmq},
        answer_within=svc.settings.ready_timeout_s,
        check_timeout=svc.settings.io_timeout_s,
    )
    app.on_cleanup.append(_close_readiness)


async def _close_readiness(app: web.Application) -> None:
    await app[READINESS].aclose()


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


def console_headers(public_ws_url: str) -> dict[str, str]:
    """The headers of the console's files. ``no-cache``: a browser revalidates them (a
    304 by ETag when unchanged) instead of keeping them for days after an upgrade,
    mixing versions. The policy: the console keeps an API key in localStorage, so only
    its own scripts run, it talks only to its API and the gateway, and no other site
    frames it."""
    connect = ["'self'"]
    parts = urlsplit(public_ws_url)
    if parts.scheme in ("ws", "wss") and _HOST_PORT.fullmatch(parts.netloc):
        connect.append(f"{parts.scheme}://{parts.netloc}")
    policy = [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        f"connect-src {' '.join(connect)}",
        "base-uri 'none'",
        # Its forms are JavaScript's: without it, none sends a key anywhere.
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
    return {
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "; ".join(policy),
    }


async def _console_response(request: web.Request, response: web.StreamResponse) -> None:
    # A signal, not the handlers: add_static's answers (304s included) get them too.
    if request.path == "/" or request.path.startswith("/console/"):
        response.headers.update(request.app[CONSOLE_HEADERS])


def add_routes(app: web.Application, public_ws_url: str) -> None:
    """``public_ws_url``: where browsers reach the gateway (the console connects there)."""
    # Relative: the API's bind address (0.0.0.0 in a container) is not where clients
    # reach it, and a proxy in front changes the host again.
    app[OPENAPI] = orjson.dumps(build_openapi("/"))
    app[CONSOLE_HEADERS] = console_headers(public_ws_url)
    app.on_response_prepare.append(_console_response)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/", console)
    app.router.add_get("/console/config.json", console_config)
    if CONSOLE_DIR.is_dir():
        app.router.add_static("/console/", CONSOLE_DIR, follow_symlinks=False)
