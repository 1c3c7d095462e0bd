"""Request ids: every response says which request it answers (``X-Request-ID``), and
every log line and problem written while handling it carries the same id, so a client's
report of a failure can be found in the logs."""

from __future__ import annotations

import re

from aiohttp import web

from services.api.problems import Handler
from shared.ids import random_hex
from shared.logging import request_id_var

HEADER = "X-Request-ID"

# A caller's own id (a proxy's, a client's) is kept so one id follows the request
# through every hop; anything else is replaced rather than logged or echoed as is.
_ACCEPTED = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id(header: str | None) -> str:
    """The caller's id if it is a plain token of at most 128 characters, else a new one."""
    if header is not None and _ACCEPTED.fullmatch(header):
        return header
    return random_hex()


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id(request.headers.get(HEADER))
    # aiohttp runs each request in a task of its own: this labels its logs alone.
    request_id_var.set(rid)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        # Redirects and the like, raised past the problem middleware.
        exc.headers[HEADER] = rid
        raise
    response.headers[HEADER] = rid
    return response
