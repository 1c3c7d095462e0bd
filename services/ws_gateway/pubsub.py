"""The hub's Redis connection: one pattern subscription, read by a protocol that hands
every message of a socket read to the hub as it parses it.

redis-py's ``PubSub.get_message`` costs a coroutine, a timeout and a retry wrapper per
message: about 9 µs of CPU more per message than hiredis' parser fed the bytes of whole
reads (bench/README.md). The gateway receives every event of the namespace, two or more
per task: the gateway spent 11 % less CPU per task with this.

Silence is checked as redis-py's ``health_check_interval`` does: a connection quiet for
``idle_s`` gets a PING, and one that does not answer within ``io_timeout`` is lost."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, NoReturn, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from shared.futures import mark_retrieved

log = logging.getLogger(__name__)

OnMessage = Callable[[bytes, bytes], None]  # channel, data


def _command(*parts: str) -> bytes:
    # hiredis' stub types its argument as a tuple of one item.
    packed: bytes = hiredis.pack_command(parts)  # type: ignore[arg-type]
    return packed


_PING = _command("PING")


class SubscriberLost(ConnectionError):
    """The subscription is gone: the connection closed, failed, went silent, or Redis
    answered with an error."""


class SubscriberRefused(SubscriberLost):
    """Redis refused a command to the user (NOPERM): its ACL lets it not subscribe."""


def _answered(reply: hiredis.ReplyError) -> SubscriberLost:
    if str(reply).startswith("NOPERM "):
        # Without its code, as redis-py tells a NOPERM to the other connections.
        return SubscriberRefused(str(reply).removeprefix("NOPERM "))
    return SubscriberLost(f"redis answered: {reply}")


class _Protocol(asyncio.Protocol):
    def __init__(self, on_message: OnMessage, loop: asyncio.AbstractEventLoop) -> None:
        self._on_message = on_message
        self._loop = loop
        self._parser = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        # Replies that are not messages (AUTH's OK, the subscription's confirmation), for
        # the handshake; the PING's pong is dropped.
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.lost: asyncio.Future[None] = loop.create_future()
        # Marked as seen: a connection lost before anyone watches it (a cancelled
        # opening) must not log "exception was never retrieved".
        self.lost.add_done_callback(mark_retrieved)
        self.last_read = loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    self._fail(_answered(reply))
                    return
                if isinstance(reply, list) and len(reply) == 4 and reply[0] == b"pmessage":
                    self._on_message(reply[2], reply[3])
                elif not (isinstance(reply, list) and reply and reply[0] == b"pong"):
                    self.replies.put_nowait(reply)
        except Exception as exc:  # not RESP, or a bug in the dispatch
            # Whatever else this read held goes with the connection; the hub's
            # reconnect resyncs every listener.
            log.exception("reading the redis subscription failed")
            self._fail(SubscriberLost(f"reading the subscription failed: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_exception(SubscriberLost(f"redis connection lost: {exc!r}"))

    def _fail(self, exc: SubscriberLost) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class PatternSubscriber:
    """``await PatternSubscriber.open(...)`` returns once Redis confirmed the subscription;
    from then on ``on_message`` gets each message, and ``watch()`` raises SubscriberLost
    when the subscription ends."""

    def __init__(self, protocol: _Protocol, *, io_timeout: float, idle_s: float) -> None:
        self._protocol = protocol
        self._io_timeout = io_timeout
        self._idle_s = idle_s

    @classmethod
    async def open(
        cls, url: str, pattern: str, on_message: OnMessage, *, io_timeout: float, idle_s: float
    ) -> PatternSubscriber:
        loop = asyncio.get_running_loop()
        target: dict[str, Any] = dict(parse_url(url))
        protocol = _Protocol(on_message, loop)
        async with asyncio.timeout(io_timeout):
            if target.get("connection_class") is UnixDomainSocketConnection:
                await loop.create_unix_connection(lambda: protocol, target["path"])
            else:
                await loop.create_connection(
                    lambda: protocol,
                    target.get("host", "localhost"),
                    target.get("port", 6379),
                    ssl=_tls(target) if target.get("connection_class") is SSLConnection else None,
                )
            subscriber = cls(protocol, io_timeout=io_timeout, idle_s=idle_s)
            try:
                await subscriber._handshake(target, pattern)
            except BaseException:
                subscriber.close()
                raise
        return subscriber

    async def _handshake(self, target: dict[str, Any], pattern: str) -> None:
        transport = self._protocol.transport
        assert transport is not None
        user: str = target.get("username") or ""
        password: str = target.get("password") or ""
        if user or password:  # as redis-py does: a user alone authenticates with ""
            transport.write(
                _command("AUTH", user, password) if user else _command("AUTH", password)
            )
            await self._reply()
        transport.write(_command("PSUBSCRIBE", pattern))
        reply = await self._reply()
        # The confirmation proves the subscription is active on the server.
        if not (isinstance(reply, list) and reply and reply[0] == b"psubscribe"):
            raise SubscriberLost(f"redis did not confirm the subscription: {reply!r}")

    async def _reply(self) -> Any:
        got = asyncio.ensure_future(self._protocol.replies.get())
        try:
            await asyncio.wait({got, self._protocol.lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not got.done():  # lost, timed out or cancelled: the read goes too
                got.cancel()
        if not got.done() or got.cancelled():
            self._protocol.lost.result()  # raises the loss
        return got.result()

    async def watch(self) -> NoReturn:
        """PING a quiet connection; raise SubscriberLost once the subscription ends."""
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        while True:
            quiet = loop.time() - protocol.last_read
            if quiet < self._idle_s:
                await self._unless_lost(self._idle_s - quiet)
                continue
            assert protocol.transport is not None
            pinged = loop.time()
            protocol.transport.write(_PING)
            await self._unless_lost(self._io_timeout)
            if protocol.last_read < pinged:
                self.close()
                raise SubscriberLost(f"redis did not answer a PING within {self._io_timeout} s")

    async def _unless_lost(self, seconds: float) -> None:
        lost = self._protocol.lost
        await asyncio.wait({lost}, timeout=seconds)
        if lost.done():
            lost.result()  # raises the loss

    def close(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.abort()
        lost = self._protocol.lost
        if not lost.done():
            lost.set_exception(SubscriberLost("closed"))


def _tls(target: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py makes of this URL (every ``ssl_*`` option of its query):
    the services' other Redis connections are redis-py's, and one URL must mean the
    same to all of them."""
    options = {k: v for k, v in target.items() if k != "connection_class"}
    return SSLConnection(**options).ssl_context.get()
