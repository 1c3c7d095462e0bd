"""What a request is refused for before its token is read: its method, a WebSocket
handshake that websockets would refuse, an API key where a token goes. Reading a
single-use token spends it (one GETDEL), so a request refused after that would leave
its client with a burnt token for a mistake it can fix. Pure: no I/O."""

from __future__ import annotations

from websockets.http11 import Response

from services.ws_gateway.responses import problem

GET = ("GET",)
# As aiohttp answers the API's and the worker's GET routes. Not for the streams: a HEAD
# would have to spend the token to say what a GET would get.
GET_HEAD = ("GET", "HEAD")


def wrong_method(method: str, allowed: tuple[str, ...]) -> Response | None:
    """A 405 naming the ``allowed`` methods, or None for one of them."""
    if method in allowed:
        return None
    allow = ", ".join(allowed)
    return problem(405, f"{method} is not allowed here; use {allow}", {"Allow": allow})
