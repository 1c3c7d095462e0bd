"""RabbitMQ plumbing: connecting, declaring the topology, publishing with confirms.

The topology: a durable direct exchange routes task messages to two durable quorum
queues, the normal lane and the high lane (tasks of priority ``wire.HIGH_PRIORITY`` and
above), each by its own routing key. Both take the same arguments: each dead-letters
crash loops (past ``x-delivery-limit``) at least once to the dead-letter queue, and
refuses publishes past ``x-max-length`` (``reject-publish``, which at-least-once
dead-lettering requires anyway): a nack the relay sees, never a silently dropped
message."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq
import pamqp.frame
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import AMQPError
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from shared.db import redacted
from shared.errors import ConfigError, DependencyError
from shared.settings import CommonSettings
from shared.wire import Wire, is_high

T = TypeVar("T")


async def connect(url: str, name: str, timeout: float) -> AbstractRobustConnection:
    """A robust connection named after its process, so the broker's UI tells who is who.

    A login or a virtual host the broker refuses is a ConfigError: waiting does not
    mend LONGHAUL_AMQP_URL (the start would wait its whole timeout, then blame the
    broker's reachability)."""
    with _handshake(url):
        return await _connected(url, name, timeout)


async def connect_once(url: str, name: str, timeout: float) -> AbstractConnection:
    """A plain connection for a one-shot command: it does not reconnect, so a channel
    the broker closes (a passive declare of a missing queue) stays closed, and a broker
    that goes away fails the command. Refusals are ConfigErrors, as for ``connect``."""
    with _handshake(url):
        return await aio_pika.connect(
            url, timeout=timeout, client_properties={"connection_name": name}
        )


# How a connection the peer ended shows, once open.
_CUT = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


@contextlib.contextmanager
def _handshake(url: str) -> Iterator[None]:
    """What a connect's failures mean: refusals are ConfigErrors; a connection the
    broker (or what listens there) closes or resets during the handshake is said so:
    aiormq told it as StopAsyncIteration, "Connection lost" or its own words."""
    try:
        yield
    except aiormq.exceptions.ProbableAuthenticationError:
        raise ConfigError(
            f"RabbitMQ at {redacted(url)} refused the login: check the user and password"
            " in LONGHAUL_AMQP_URL"
        ) from None
    except aiormq.exceptions.InvalidFrameError as exc:
        # The broker answers an open of a virtual host it lacks, or one the user may not
        # use, with a close: aiormq says so only in its message.
        if "Connection.Close" not in str(exc):
            raise
        raise ConfigError(
            f"RabbitMQ at {redacted(url)} refused to open the virtual host: it does not"
            " exist or the user may not use it (the path of LONGHAUL_AMQP_URL)"
        ) from None
    except (StopAsyncIteration, *_CUT):
        raise _cut() from None
    except aiormq.exceptions.AMQPConnectionError as exc:
        if type(exc) is not aiormq.exceptions.AMQPConnectionError:  # a close with a reason
            raise
        if isinstance(exc.__cause__, OSError) and not isinstance(exc.__cause__, _CUT):
            # The socket did not open (refused, no such host, TLS): aiormq wraps that
            # OSError too, and its words say which.
            raise
        raise _cut() from None


def _cut() -> ConnectionError:
    # A dependency's error, waited out as an unreachable broker is.
    return ConnectionError("the broker closed or reset the connection during the AMQP handshake")


@contextlib.asynccontextmanager
async def starting(failed: str, timeout: float) -> AsyncIterator[None]:
    """Around a step of a start on a connection already open (a channel, the topology's
    declares, the consumers): a broker that closes the channel or the connection, or
    answers nothing for ``timeout`` (aio-pika's calls wait for ever), stops the start
    with one line, ``failed`` saying what was not done. A ConfigError goes through."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:  # an OSError too: first
        raise DependencyError(
            f"RabbitMQ: {failed} within {timeout:g}s (LONGHAUL_IO_TIMEOUT_S)"
        ) from None
    except (AMQPError, OSError, RuntimeError) as exc:
        raise DependencyError(f"RabbitMQ: {failed}: {type(exc).__name__}: {exc}") from None


async def _connected(url: str, name: str, timeout: float) -> AbstractRobustConnection:
    """aio_pika.connect_robust's connection, closed should its connect fail or be cut
    short (a start's deadline): aio-pika's task that reconnects would go on for ever,
    ignoring its cancellation, and the event loop's end waited for it (the process hung
    at its exit, SIGTERM or not)."""
    connection = aio_pika.RobustConnection(
        make_url(url), client_properties={"connection_name": name}
    )
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        await close(connection, timeout)
        raise
    return connection


async def close(connection: AbstractConnection, timeout: float) -> None:
    """Close within ``timeout``: a connection to a broker that is down may never answer."""
    with contextlib.suppress(AMQPError, OSError, RuntimeError, TimeoutError):
        await asyncio.wait_for(connection.close(), timeout)


def task_queue_arguments(settings: CommonSettings, wire: Wire) -> dict[str, Any]:
    """Every declarer must pass identical arguments, or the broker refuses the declare."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": wire.dead_letter_exchange,
        "x-dead-letter-routing-key": wire.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": settings.queue_max_length,
    }


@dataclass(frozen=True)
class Topology:
    exchange: AbstractExchange
    queue: AbstractQueue  # the normal lane
    high_queue: AbstractQueue  # the high lane
    dead_letters: AbstractQueue


async def declare(channel: AbstractChannel, settings: CommonSettings, wire: Wire) -> Topology:
    """Declare (idempotently) every exchange and queue Longhaul uses: those
    ``Wire.exchanges`` and ``Wire.queues`` name, which a namespace's deletion removes.

    A user the broker does not let declare or bind them is a ConfigError: its
    permissions are to fix, and no wait mends them."""
    try:
        return await _declare(channel, settings, wire)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise ConfigError(
            f"RabbitMQ refused the user of LONGHAUL_AMQP_URL ({exc}): it needs the configure,"
            " write and read permissions on this namespace's exchanges and queues"
        ) from None


async def _declare(channel: AbstractChannel, settings: CommonSettings, wire: Wire) -> Topology:
    dlx = await _declared(
        "exchange",
        wire.dead_letter_exchange,
        channel.declare_exchange(
            wire.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        ),
    )
    dead = await _declared(
        "queue",
        wire.dead_letter_queue,
        channel.declare_queue(
            wire.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        ),
    )
    await dead.bind(dlx, routing_key=wire.dead_letter_queue)
    exchange = await _declared(
        "exchange",
        wire.tasks_exchange,
        channel.declare_exchange(wire.tasks_exchange, aio_pika.ExchangeType.DIRECT, durable=True),
    )
    queue = await _declare_task_queue(channel, settings, wire, wire.tasks_queue)
    await queue.bind(exchange, routing_key=wire.tasks_routing_key)
    high_queue = await _declare_task_queue(channel, settings, wire, wire.high_tasks_queue)
    await high_queue.bind(exchange, routing_key=wire.high_tasks_routing_key)
    return Topology(exchange=exchange, queue=queue, high_queue=high_queue, dead_letters=dead)


async def _declare_task_queue(
    channel: AbstractChannel, settings: CommonSettings, wire: Wire, name: str
) -> AbstractQueue:
    """The broker refuses a declare whose arguments differ from the queue's (it keeps
    the first declarer's): a queue of another type, one another program or version
    declared, or settings to fix; not a crash. It names the first argument it compares
    that differs, which for a classic queue is a dead-letter one, not its type."""
    try:
        return await channel.declare_queue(
            name, durable=True, arguments=task_queue_arguments(settings, wire)
        )
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        kind = await _queue_type(channel, name)
        if kind not in (None, "quorum"):
            raise ConfigError(
                f"queue {name} is a {kind} queue, not the quorum queue this code declares:"
                " delete it (move its messages elsewhere first), or set another"
                " LONGHAUL_NAMESPACE"
            ) from None
        if _INEQUIVALENT.search(str(exc)) is None:
            raise _declared_otherwise("queue", name, exc) from None
        raise ConfigError(
            f"queue {name} refuses these settings: LONGHAUL_DELIVERY_LIMIT and"
            f" LONGHAUL_QUEUE_MAX_LENGTH must match what it was declared with ({exc})"
        ) from None


# The refusals that name a setting of ours.
_INEQUIVALENT = re.compile(r"inequivalent arg 'x-(delivery-limit|max-length)'")
# The broker's refusal of another type: a queue declared without one is a classic queue.
_CURRENT_TYPE = re.compile(
    r"inequivalent arg 'x-queue-type'.* current is (?:none|'(\w+)'|the value '(\w+)')"
)
# No queue type the broker has: a declare of it creates no queue.
_NO_TYPE = "longhaul-type-probe"


async def _queue_type(channel: AbstractChannel, name: str) -> str | None:
    """The type of queue ``name``, from the broker's refusal of a declare of a type it
    does not have (no argument tells it otherwise; should the queue have gone meanwhile,
    that declare creates none). None when it names another argument first, or fails."""
    try:
        await channel.reopen()  # the refusal closed it
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": _NO_TYPE})
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        if (current := _CURRENT_TYPE.search(str(exc))) is not None:
            return current.group(1) or current.group(2) or "classic"
    except (AMQPError, OSError, RuntimeError):
        pass  # the first refusal is told
    return None


async def _declared(kind: str, name: str, declaring: Awaitable[T]) -> T:
    """An exchange or queue that exists with other arguments (another program's, or
    another version's, in this namespace) is refused: no wait mends that."""
    try:
        return await declaring
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise _declared_otherwise(kind, name, exc) from None


def _declared_otherwise(kind: str, name: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"{kind} {name} exists with other arguments than this code declares ({exc}):"
        " another program or version declared it in LONGHAUL_NAMESPACE"
    )


_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


@dataclass(frozen=True)
class Outgoing:
    message_id: str
    body: bytes
    trace_id: str | None = None
    # The task's: a Publisher with a high lane routes by it.
    priority: int = 0


@dataclass(frozen=True)
class Published:
    """What became of a batch: which messages the broker confirmed, and why not others."""

    confirmed: list[bool]
    # Nacked or returned: the broker is refusing (queue full, no route).
    refused: int = 0
    # No confirm in time, or no channel: the broker is slow or unreachable.
    failed: int = 0
    error: str | None = None


class Publisher:
    """Publishes persistent messages with confirms: a batch goes to the broker in one
    write and is bounded by one timeout for the whole batch.

    Straight onto aiormq's channel, as its own ``basic_publish`` does it (the channel's
    lock, its delivery tags, confirmation futures and returned-message lookup), but for
    the batch at once: ``basic_publish`` queued each message on its own and waited for
    the writer to flush it before the next one, with the method frame and a task per
    message; that was a third of the API's CPU when it published single submits.

    With ``high_routing_key``, a message of a high priority (``wire.is_high``) goes with
    that routing key (the high lane), the others with ``routing_key``."""

    def __init__(
        self,
        channel: AbstractChannel,
        exchange: str,
        routing_key: str,
        timeout: float,
        *,
        high_routing_key: str | None = None,
    ) -> None:
        # A channel opened with publisher confirms and on_return_raises.
        self._channel = channel
        self._exchange = exchange
        self._routing_key = routing_key
        self._high_routing_key = high_routing_key
        self._timeout = timeout
        # Both lanes' Basic.Publish frames are the same for every message of a channel
        # number.
        self._methods: tuple[int, bytes, bytes] | None = None

    async def publish(self, batch: Sequence[Outgoing]) -> Published:
        if not batch:
            return Published([])
        confirms: list[asyncio.Future[Any]] = []
        error: str | None = None
        try:
            async with asyncio.timeout(self._timeout):
                await self._send(batch, confirms)
                await asyncio.wait(confirms)
        except TimeoutError:
            error = "no confirm in time"
        except Exception as exc:  # noqa: BLE001 - reported in Published, as a confirm's error
            # The channel or the connection is gone: nothing of it will be confirmed.
            error = f"{type(exc).__name__}: {exc}"
        if not confirms:
            return Published([False] * len(batch), failed=len(batch), error=error)
        for future in confirms:
            if not future.done():
                future.cancel()  # aiormq ignores a confirm that comes later
        return settled(confirms, error)

    async def _send(self, batch: Sequence[Outgoing], confirms: list[asyncio.Future[Any]]) -> None:
        """Queue the batch for the connection's writer as one frame sequence and wait
        until it is written; ``confirms`` gets one confirmation future per message, in
        order, once the batch is queued."""
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the publishing channel is closed")
        channel = await self._channel.get_underlay_channel()
        if not isinstance(channel, aiormq.Channel) or not channel.publisher_confirms:
            raise RuntimeError("a Publisher needs an aiormq channel with publisher confirms")
        _, normal, high = self._method_frames(channel.number)
        payload: list[bytes] = []
        for item in batch:
            payload.append(high if is_high(item.priority) else normal)
            payload.append(self._header(item, channel.number))
            size = channel.max_content_size if channel.max_content_size > 0 else len(item.body)
            for start in range(0, len(item.body), size):  # frame_max 0: no limit
                chunk = item.body[start : start + size]
                payload.append(pamqp.frame.marshal(ContentBody(chunk), channel.number))
        async with channel.lock:
            written = channel.create_future()
            try:
                await channel.write_queue.put(
                    ChannelFrame(
                        payload=b"".join(payload), should_close=False, drain_future=written
                    )
                )
            except BaseException:
                written.cancel()
                raise
            # Nothing awaited since the put: the writer has not sent the batch yet, so
            # no confirm can come before its future exists. The broker numbers a
            # channel's publishes from 1; so does the channel's delivery_tag.
            for tag, item in enumerate(batch, start=channel.delivery_tag + 1):
                confirm = channel.create_future()
                channel.confirmations[tag] = confirm
                # Where aiormq looks a returned (unroutable) message up.
                channel.message_id_delivery_tag[item.message_id] = tag
                confirm.add_done_callback(functools.partial(_forget, channel, item.message_id, tag))
                confirms.append(confirm)
            channel.delivery_tag += len(batch)
            # Not `await written`: a closing channel rejects it with the close's reason,
            # which may be CancelledError; the confirms report that failure instead.
            await asyncio.wait([written])

    def _method_frames(self, number: int) -> tuple[int, bytes, bytes]:
        """The channel's Basic.Publish frames: the normal lane's and the high lane's."""
        if self._methods is None or self._methods[0] != number:
            normal = self._publish_frame(self._routing_key, number)
            high = (
                normal
                if self._high_routing_key is None
                else self._publish_frame(self._high_routing_key, number)
            )
            self._methods = (number, normal, high)
        return self._methods

    def _publish_frame(self, routing_key: str, number: int) -> bytes:
        frame = Basic.Publish(exchange=self._exchange, routing_key=routing_key, mandatory=True)
        return pamqp.frame.marshal(frame, number)

    @staticmethod
    def _header(item: Outgoing, number: int) -> bytes:
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=_PERSISTENT,
            message_id=item.message_id,
            correlation_id=item.trace_id,
        )
        return pamqp.frame.marshal(ContentHeader(0, len(item.body), properties), number)


def task_publisher(channel: AbstractChannel, wire: Wire, timeout: float) -> Publisher:
    """The relays' publisher: each task message to its lane, by its task's priority."""
    return Publisher(
        channel,
        wire.tasks_exchange,
        wire.tasks_routing_key,
        timeout,
        high_routing_key=wire.high_tasks_routing_key,
    )


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: asyncio.Future[Any]) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


def settled(confirms: Sequence[asyncio.Future[Any]], error: str | None) -> Published:
    """What settled confirmation futures say, ``error`` being what failed the whole batch
    (a timeout, a lost channel). Refusals are named beside it: a batch that timed out
    may also have been refused in part, and the reason to stop admitting is the latter."""
    confirmed, refused, failed = [], 0, 0
    failure: str | None = None
    refusal: str | None = None
    for future in confirms:
        reason = None if future.cancelled() else future.exception()
        ok = not future.cancelled() and reason is None
        confirmed.append(ok)
        if ok:
            continue
        if isinstance(reason, aiormq.exceptions.DeliveryError):
            refused += 1  # nacked, or returned as unroutable (PublishError)
            refusal = refusal or f"{type(reason).__name__}: {reason}"
        else:
            failed += 1
            if reason is not None:
                failure = failure or f"{type(reason).__name__}: {reason}"
    if failed and error is None:
        error = failure or "no confirm"
    described = "; ".join(part for part in (error, refusal and f"refused: {refusal}") if part)
    return Published(confirmed, refused, failed, described or None)
