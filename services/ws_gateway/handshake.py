"""The gateway's connection class: websockets' ``ServerConnection`` with the handshake
deadline kept here instead of by ``open_timeout``.

websockets applies ``open_timeout`` to the whole opening handshake, ``process_request``
included, and an SSE stream is served from inside ``process_request`` for as long as
its task runs (sse.py). So the server runs without ``open_timeout``, and each
connection aborts itself when its request has not been answered in time: a client that
sends its request slowly, or never, is dropped as before. A request for plain HTTP
(the SSE stream, ``plain_http``) is exempt once it is in: what it waits for then is
bounded by the gateway's own I/O timeouts, and the stream by nothing.

Such a connection also stops feeding what its client sends to websockets, which would
read it as WebSocket frames after the request and answer (a pong, an error, the end of
its output) in the middle of the response. An HTTP client has nothing more to say on
it; reading goes on, so that a client that leaves is still seen at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


class DeadlineConnection(ServerConnection):
    # Set by connection_class(): serve() takes a class, not a factory. Class attributes,
    # not per connection: an attribute more on each instance cost an idle connection
    # 1.4 KiB (measured), past what its dict holds compactly.
    handshake_timeout_s: float = 10.0
    # Called with each connection once it is gone, however it went (a lease to give back).
    on_lost: ClassVar[Callable[[DeadlineConnection], None] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plain_http = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.handshake_timeout_s, self._overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        on_lost = type(self).on_lost
        try:
            if on_lost is not None:
                on_lost(self)
        finally:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.plain_http:
            super().data_received(data)

    def eof_received(self) -> None:
        # Returning None closes the transport: for a stream, the client is done and the
        # stream ends; websockets' own handling returns None too.
        if not self.plain_http:
            super().eof_received()

    def _overdue(self) -> None:
        self._deadline = None
        if self.protocol.state is State.CONNECTING and not self.plain_http:
            self.transport.abort()


def connection_class(
    handshake_timeout_s: float, on_lost: Callable[[DeadlineConnection], None] | None = None
) -> type[DeadlineConnection]:
    return type(
        "GatewayConnection",
        (DeadlineConnection,),
        {
            "handshake_timeout_s": handshake_timeout_s,
            "on_lost": None if on_lost is None else staticmethod(on_lost),
        },
    )
