"""What a request is refused for before its token is read: its method, a WebSocket
handshake that websockets would refuse, an API key where a token goes. Reading a
single-use token spends it (one GETDEL), so a request refused after that would leave
its client with a burnt token for a mistake it can fix. Pure: no I/O."""

from __future__ import annotations

from websockets.exceptions import (
    InvalidHandshake,
    InvalidHeader,
    InvalidMethod,
    InvalidOrigin,
    InvalidProtocol,
    InvalidUpgrade,
)
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from services.ws_gateway.responses import problem
from shared import keys

GET = ("GET",)
# As aiohttp answers the API's and the worker's GET routes. Not for the streams: a HEAD
# would have to spend the token to say what a GET would get.
GET_HEAD = ("GET", "HEAD")

ORIGIN_403 = "origin not allowed"
API_KEY_401 = "this is an API key; ask POST /v1/ws-tokens for a token"
_WS_VERSION = "13"


def wrong_method(method: str, allowed: tuple[str, ...]) -> Response | None:
    """A 405 naming the ``allowed`` methods, or None for one of them."""
    if method in allowed:
        return None
    allow = ", ".join(allowed)
    return problem(405, f"{method} is not allowed here; use {allow}", {"Allow": allow})


def is_api_key(token: str) -> bool:
    """Whether ``token`` has an API key's shape: no token has it (a token is 43 or 45
    characters, a key at least 61), so no look-up can tell more."""
    return keys.parse(token) is not None


def not_a_handshake(protocol: ServerProtocol, request: Request) -> Response | None:
    """The refusal websockets' ``accept()`` would answer ``request`` with, as a problem,
    or None for a handshake it will take. It runs the same checks (method, HTTP
    version, Connection/Upgrade, Sec-WebSocket-Key/-Version, Origin); what they set on
    ``protocol`` (origin, extensions, subprotocol) ``accept()`` sets again, the same."""
    try:
        protocol.process_request(request)
    except InvalidMethod as exc:
        return wrong_method(exc.method, GET)
    except InvalidOrigin:
        return problem(403, ORIGIN_403)
    except InvalidProtocol as exc:
        return problem(505, f"{exc}; a WebSocket handshake is HTTP/1.1")
    except InvalidUpgrade as exc:
        # RFC 9110, 15.5.22: a 426 names the protocol to switch to.
        return problem(
            426,
            f"{exc}: this is a WebSocket endpoint; connect with a WebSocket client",
            {"Upgrade": "websocket"},
        )
    except InvalidHeader as exc:
        # RFC 6455, 4.4: a version refused is answered with the versions served.
        extra = (
            {"Sec-WebSocket-Version": _WS_VERSION} if exc.name == "Sec-WebSocket-Version" else {}
        )
        return problem(400, _chain(exc), extra)
    except InvalidHandshake as exc:
        return problem(400, _chain(exc))
    return None


def _chain(exc: BaseException) -> str:
    # As websockets words its own 400: an invalid Sec-WebSocket-Key says why in its cause.
    parts = [str(exc)]
    while exc.__cause__ is not None:
        exc = exc.__cause__
        parts.append(str(exc))
    return "; ".join(parts)
