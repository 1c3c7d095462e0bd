"""The gateway's connection class: websockets' ``ServerConnection`` with the handshake
deadline kept here instead of by ``open_timeout``.

websockets applies ``open_timeout`` to the whole opening handshake, ``process_request``
included, and an SSE stream is served from inside ``process_request`` for as long as
its task runs (sse.py). So the server runs without ``open_timeout``, and each
connection aborts itself when its request has not been answered in time: a client that
sends its request slowly, or never, is dropped as before. A stream that has begun is
exempt (``streaming``)."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State


class DeadlineConnection(ServerConnection):
    # Set by connection_class(): serve() takes a class, not a factory.
    handshake_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streaming = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.handshake_timeout_s, self._overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _overdue(self) -> None:
        self._deadline = None
        if self.protocol.state is State.CONNECTING and not self.streaming:
            self.transport.abort()


def connection_class(handshake_timeout_s: float) -> type[DeadlineConnection]:
    return type(
        "GatewayConnection", (DeadlineConnection,), {"handshake_timeout_s": handshake_timeout_s}
    )
