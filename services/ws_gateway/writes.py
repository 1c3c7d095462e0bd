"""Frames sent during one turn of the event loop leave in one write().

A task's running and terminal events reach the gateway together, a catch-up is several
frames, and the events of a connection's other tasks come in the same burst. Written
one by one, each frame cost a write() and, for a client on the same host, a wake-up on
its side: the gateway's most expensive system call per event.

Order holds without us: the frames wait in the websockets protocol's buffer, and
whatever websockets writes itself (``send()``, a ping, the close) takes them ahead of
its own data."""

from __future__ import annotations

import asyncio

from websockets.asyncio.connection import Connection


class CoalescedWrites:
    __slots__ = ("_flushing", "_ws", "pending")

    def __init__(self, ws: Connection) -> None:
        self._ws = ws
        self._flushing: asyncio.Handle | None = None
        # Bytes queued this turn and not yet handed to the transport: a catch-up of
        # thousands of frames happens within one turn, where the transport's buffer
        # alone never shows the client falling behind.
        self.pending = 0

    def write(self, frame: str) -> None:
        """Queue a text frame; the connection must be open."""
        data = frame.encode()
        self.pending += len(data)
        self._ws.protocol.send_text(data)
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Hand the queued frames to the transport now, not at the end of the turn."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flush()

    def _flush(self) -> None:
        self._flushing = None
        self.pending = 0
        transport = self._ws.transport
        chunks = self._ws.protocol.data_to_send()
        if not chunks or transport.is_closing():
            return  # taken by websockets' own write meanwhile, or the connection is gone
        data = b"".join(chunks)
        if data:
            transport.write(data)
        if b"" in chunks:
            # The protocol asks for the end of the stream (after a close), as
            # websockets' own send_data() does it.
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
