"""TCP proxies of the test's own in front of a shared service, the service itself
untouched. ``CutProxy`` the test can cut (its connections closed, new ones closed as soon
as they come) and restore: a network partition between one process and that service
alone. ``SilentAmqpProxy`` lets each connection to RabbitMQ open, then passes nothing.

Both are used as ``async with CutProxy(port) as proxy:``; leaving it closes every
connection. ``ClosingListener``, no proxy, closes each connection as it is accepted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Self


class _Proxy:
    """What both proxies share: a port of their own, the connections through it (a
    client's end and the service's), all aborted on leaving."""

    def __init__(self, upstream_port: int, upstream_host: str) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._abort_links()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _abort_links(self) -> None:
        for writer in list(self._links):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _linked(
        self,
        writer: asyncio.StreamWriter,
        both: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]],
    ) -> None:
        """Connect to the service and run ``both(up_reader, up_writer)`` (the two
        directions); the client's connection is aborted if the service cannot be
        reached, and both ends once ``both`` returns."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        ends = {writer, up_writer}
        self._links |= ends
        try:
            await both(up_reader, up_writer)
        finally:
            self._links -= ends
            for end in ends:
                end.transport.abort()


class CutProxy(_Proxy):
    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", *, let_through: int = -1
    ) -> None:
        """``let_through``: that many connections pass, and every later one is closed as
        it comes (a service that refuses a process's second connection); all by
        default."""
        super().__init__(upstream_port, upstream_host)
        self._let_through = let_through
        self.connections = 0
        self.is_cut = False

    def cut(self) -> None:
        """Close every connection through the proxy, and each new one as it comes."""
        self.is_cut = True
        self._abort_links()

    def restore(self) -> None:
        self.is_cut = False

    async def __aexit__(self, *_: object) -> None:
        self.is_cut = True
        await super().__aexit__()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.is_cut or 0 <= self._let_through < self.connections:
            writer.transport.abort()
            return

        async def both(up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
            # Both directions, until either side closes or the cut aborts them.
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        await self._linked(writer, both)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    # The other direction ends with it.
    writer.transport.abort()


# A method frame's payload begins with its class and method: Connection.OpenOk's.
_OPEN_OK = (10).to_bytes(2, "big") + (41).to_bytes(2, "big")


class SilentAmqpProxy(_Proxy):
    """In front of RabbitMQ: each connection opens (every frame up to the broker's
    Connection.OpenOk passes), then nothing passes either way, and nothing is closed: a
    broker that took the connection and stopped answering, as behind a partition that
    drops packets."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        super().__init__(upstream_port, upstream_host)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened = asyncio.Event()

        async def both(up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
            await asyncio.gather(
                _until_open(reader, up_writer, opened),
                _frames_until_open(up_reader, writer, opened),
            )

        await self._linked(writer, both)


async def _until_open(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened: asyncio.Event
) -> None:
    """The client's bytes, until the connection is open; then dropped."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            if not opened.is_set():
                writer.write(data)
    writer.transport.abort()  # the client left: the broker's side goes too


async def _frames_until_open(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened: asyncio.Event
) -> None:
    """The broker's frames up to its Connection.OpenOk; later ones dropped."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while not opened.is_set():
            header = await reader.readexactly(7)  # type, channel, payload size
            rest = await reader.readexactly(int.from_bytes(header[3:7], "big") + 1)
            writer.write(header + rest)
            if header[0] == 1 and rest.startswith(_OPEN_OK):
                opened.set()
        while await reader.read(65536):
            pass
    writer.transport.abort()


class ClosingListener:
    """A port whose every connection is accepted and closed at once, unread: by a FIN,
    or with ``reset`` a RST (a port whose service is gone, booting, or behind a proxy
    without its backend). Its own thread, so the close does not wait for the test's
    event loop. ``with ClosingListener() as listener:``; ``listener.port``."""

    def __init__(self, *, reset: bool = False) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._reset = reset
        self.port: int = self._socket.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ClosingListener:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        # shutdown() wakes the accept() that close() alone leaves blocked.
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                connection, _ = self._socket.accept()
                self.connections += 1
                if self._reset:
                    linger = struct.pack("ii", 1, 0)
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                connection.close()
