"""Consumes the task queues, the normal lane and the high lane, each on its own channel:
one asyncio task per delivery (each lane's prefetch bounds how many), acked only after
the runner committed the outcome. At most ``concurrency`` deliveries of both lanes run at
once, and ``reserved`` more of the high lane; the others wait for a slot at the gate,
which serves the high lane first (services/worker/gate.py). A waiting delivery counts as
in flight.

Acks of deliveries that finish together go out together: a run of finished deliveries
from the oldest one still unsettled on the channel is acked with one ``multiple`` ack
(RabbitMQ spent a quarter to a third of the CPU per message of an ack each); one
that finished while an older delivery still runs is acked alone, so a long task never
holds back the acks (and the prefetch window) of short ones. Acks wait up to
``ACK_LINGER_S`` for others to join them. The channel must carry no other consumer: a
multiple ack settles every older delivery of its channel.

Deliveries are taken from aiormq's channel as it hands them over, not through aio-pika's
callback: aio-pika wraps each in an ``IncomingMessage`` (26 guarded attribute sets, about
20 µs) and runs the callback in a task of its own, on top of aiormq's task and ours. aio-pika
still makes the consumer and restores it after a reconnect, with its own wrapper around
``on_message``: that path works as well, only slower, until the watch puts the direct one
back (within ``WATCH_S``).

Draining: cancel the consumers so the broker sends no more, hand back at once the
deliveries still waiting for a slot, let running tasks finish within the grace period,
hand back the rest, then give up on any that still hang."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError
from pamqp.commands import Basic
from prometheus_client import Counter, Gauge

from services.worker.gate import Gate, GateClosed
from services.worker.runner import Runner, StopReason
from shared.groupcommit import GroupCommit
from shared.liveness import beat

log = logging.getLogger(__name__)
# How often the watchdog checks each lane's consumer (app.py bounds its beats by it).
WATCH_S = 5.0

DELIVERIES = Counter("longhaul_worker_deliveries_total", "Task messages delivered to this worker")
ACK_FAILURES = Counter(
    "longhaul_worker_ack_failures_total",
    "Acks that failed (stale channel); the redelivery is absorbed",
)
IN_FLIGHT = Gauge(
    "longhaul_worker_in_flight", "Deliveries being processed or waiting for a run slot"
)
CONSUMING = Gauge(
    "longhaul_worker_consuming", "1 while the broker delivers to this worker (on every lane)"
)
WAITING = Gauge("longhaul_worker_waiting", "Deliveries in flight waiting for a run slot")


# A finished delivery keeps its prefetch slot this much longer, at most.
ACK_LINGER_S = 0.01

_SETTLE_ERRORS = (AMQPError, aiormq.exceptions.ChannelInvalidStateError, RuntimeError)
# A consume or cancel that failed so, or outlasted its bound (the broker away).
_CONSUMER_CALL_ERRORS: tuple[type[BaseException], ...] = (*_SETTLE_ERRORS, TimeoutError)


@dataclass(frozen=True)
class _Delivery:
    """What settling a delivery needs, taken when it arrived."""

    channel: aiormq.abc.AbstractChannel
    tag: int


@dataclass(eq=False)
class _Lane:
    """One queue and our consumer of it, on a channel of its own."""

    queue: AbstractQueue
    # aio-pika's callback: what it registers and restores.
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]] = field(repr=False)
    # aiormq's: the same, without aio-pika's wrapping (one object, compared by identity).
    direct: Callable[[aiormq.abc.DeliveredMessage], Awaitable[None]] = field(repr=False)
    tag: str | None = None
    # The watchdog found the consumer gone once (see watch).
    missed: bool = False


class Consumer:
    def __init__(
        self,
        queue: AbstractQueue,
        runner: Runner,
        timeout: float,
        prefetch: int,
        high_queue: AbstractQueue | None = None,
        reserved: int = 0,
    ) -> None:
        """``prefetch`` is the worker's concurrency: the normal lane's prefetch, and how
        many deliveries of both run at once, plus ``reserved`` more of the high lane only
        (whose prefetch is the sum). ``high_queue`` (on a channel of its own) is the high
        lane."""
        self._lanes = [_Lane(queue, self._on_normal, self._delivered_normal)]
        if high_queue is not None:
            self._lanes.append(_Lane(high_queue, self._on_high, self._delivered_high))
        self._runner = runner
        self._timeout = timeout
        self._gate = Gate(prefetch, reserved)
        self._tasks: set[asyncio.Task[None]] = set()
        # Per channel (a reconnect brings a new one, its tags start over): delivery tag ->
        # finished, for every delivery not yet acked or nacked.
        self._unsettled: dict[aiormq.abc.AbstractChannel, dict[int, bool]] = {}
        # Acks linger a little: nobody waits for them, and at moderate load the acks of
        # a few milliseconds share one frame (see the module's docstring). Not once the
        # whole prefetch window waits for them: the broker sends nothing more until then.
        self._acks: GroupCommit[_Delivery, None] = GroupCommit(
            self._ack_batch, name="acker", linger_s=ACK_LINGER_S, enough=prefetch
        )

    async def start(self) -> None:
        for lane in self._lanes:
            lane.tag = await lane.queue.consume(lane.on_message)
            _take_directly(lane, await self._consumers(lane))

    async def consuming(self) -> bool:
        """Whether the broker still delivers to our consumers (every lane's) on the
        current channels."""
        for lane in self._lanes:
            if not await self._lane_consuming(lane):
                return False
        return True

    @classmethod
    async def _lane_consuming(cls, lane: _Lane) -> bool:
        return lane.tag is not None and lane.tag in await cls._consumers(lane)

    @staticmethod
    async def _consumers(lane: _Lane) -> dict[str, Any]:
        """The consumers of the lane's current channel, by tag (none while reconnecting:
        the robust channel restores ours)."""
        try:
            underlay = await lane.queue.channel.get_underlay_channel()
        except aiormq.exceptions.ChannelInvalidStateError:
            return {}
        consumers: dict[str, Any] = getattr(underlay, "consumers", {})  # aiormq.Channel
        return consumers

    async def watch(self, stop: asyncio.Event, interval_s: float = WATCH_S) -> None:
        """Consume again if the consumer is gone while the channel is up.

        The robust connection restores consumers after a reconnect, but not after the
        broker cancels one (a deleted queue, a quorum leader that went away, aio-pika
        issue 231 after some restarts). Two misses in a row are required: right after a
        reconnect the restore may simply not have run yet, and consuming twice with one
        tag would close the channel. Every lane is watched on its own."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set() or any(lane.tag is None for lane in self._lanes):
                return
            consuming = True
            for lane in self._lanes:
                beat()
                consuming = await self._watch_lane(lane) and consuming
            CONSUMING.set(int(consuming))

    async def _watch_lane(self, lane: _Lane) -> bool:
        """One look at a lane's consumer: whether it was there. Each call is bounded: the
        robust channel waits for its connection for as long as the broker is away, and
        a watch waiting that long would be taken for hung (shared.liveness)."""
        try:
            async with asyncio.timeout(self._timeout):
                consumers = await self._consumers(lane)
        except TimeoutError:
            return False  # reconnecting, no miss: the robust channel restores the consumer
        if lane.tag is None:
            return True  # cancelled meanwhile by the drain: not to be consumed again
        if lane.tag in consumers:
            _take_directly(lane, consumers)  # restored after a reconnect with aio-pika's
            lane.missed = False
            return True
        if not lane.missed:
            lane.missed = True
            return False
        try:
            async with asyncio.timeout(self._timeout):
                await lane.queue.consume(lane.on_message, consumer_tag=lane.tag)
                _take_directly(lane, await self._consumers(lane))
        except _CONSUMER_CALL_ERRORS as exc:
            log.warning(
                "could not consume again; will retry",
                extra={"queue": lane.queue.name, "error": repr(exc)},
            )
            return False
        log.warning(
            "the broker had dropped our consumer; consuming again",
            extra={"queue": lane.queue.name},
        )
        lane.missed = False
        return False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _on_normal(self, message: AbstractIncomingMessage) -> None:
        self._accept(
            message.channel, message.delivery_tag or 0, message.body, message.headers, False
        )

    async def _on_high(self, message: AbstractIncomingMessage) -> None:
        self._accept(
            message.channel, message.delivery_tag or 0, message.body, message.headers, True
        )

    async def _delivered_normal(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._take(message, high=False)

    async def _delivered_high(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._take(message, high=True)

    def _take(self, message: aiormq.abc.DeliveredMessage, high: bool) -> None:
        deliver = message.delivery
        assert isinstance(deliver, Basic.Deliver)  # what a consumer is handed
        headers = message.header.properties.headers or {}
        self._accept(message.channel, deliver.delivery_tag or 0, message.body, headers, high)

    def _accept(
        self,
        channel: aiormq.abc.AbstractChannel,
        tag: int,
        body: bytes,
        headers: Mapping[str, Any],
        high: bool,
    ) -> None:
        """Start the delivery's own task: it outlives the task its channel handed it over
        in, which the channel cancels when it closes (a run then still commits)."""
        DELIVERIES.inc()
        # The channel as it is now (a reconnect brings another).
        delivery = _Delivery(channel, tag)
        self._unsettled.setdefault(channel, {})[tag] = False
        task = asyncio.create_task(
            self._handle(body, headers, delivery, high),
            name=f"delivery-{'high-' if high else ''}{tag}",
        )
        self._tasks.add(task)
        IN_FLIGHT.set(len(self._tasks))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        IN_FLIGHT.set(len(self._tasks))

    async def _handle(
        self, body: bytes, headers: Mapping[str, Any], delivery: _Delivery, high: bool
    ) -> None:
        try:
            # The fast path first: no coroutine to wait with while a slot is free.
            entered = self._gate.try_enter(high)
        except GateClosed:
            # Arrived after the drain closed the gate (our consumer's cancel had not
            # taken effect): left unsettled, the channel's close returns it, once. A nack
            # could bring it straight back to us, a delivery counted each time, until the
            # queue's delivery limit dead-lettered a healthy task.
            return
        if not entered:
            try:
                await self._wait_for_slot(high)
            except GateClosed:
                # Waiting when the drain began: never started, handed back at once for
                # another worker to take.
                await self._nack(delivery)
                return
        try:
            await self._runner.process(body, headers)
        except asyncio.CancelledError:
            # Stopping: not acked, so the broker redelivers it when the channel closes.
            raise
        except Exception:
            # A bug, not a task failure: requeue; a message that keeps crashing us is
            # dead-lettered by the queue's delivery limit.
            log.exception("processing failed unexpectedly; requeueing the message")
            await self._nack(delivery)
            return
        finally:
            self._gate.leave(high)
        await self._acks.submit(delivery)

    async def _wait_for_slot(self, high: bool) -> None:
        """Every slot is taken: wait for one (GateClosed once draining)."""
        WAITING.set(self._gate.waiting + 1)
        try:
            await self._gate.enter(high)
        finally:
            WAITING.set(self._gate.waiting)

    async def _nack(self, delivery: _Delivery) -> None:
        try:
            await delivery.channel.basic_nack(delivery.tag, requeue=True)
        except _SETTLE_ERRORS as exc:
            _settle_failed(exc)
        # Forgotten only now: until the nack is out, no multiple ack may cover it.
        self._forget(delivery.channel, [delivery.tag])

    async def _ack_batch(self, deliveries: list[_Delivery]) -> list[None]:
        by_channel: dict[aiormq.abc.AbstractChannel, list[int]] = {}
        for delivery in deliveries:
            self._unsettled.get(delivery.channel, {})[delivery.tag] = True
            by_channel.setdefault(delivery.channel, []).append(delivery.tag)
        for channel, finished in by_channel.items():
            await self._ack_channel(channel, finished)
        return [None] * len(deliveries)

    async def _ack_channel(self, channel: aiormq.abc.AbstractChannel, finished: list[int]) -> None:
        unsettled = self._unsettled.get(channel, {})
        run_end = 0  # the end of the run of finished deliveries from the oldest (0: none)
        for tag in sorted(unsettled):
            if not unsettled[tag]:
                break
            run_end = tag
        try:
            if run_end:
                await channel.basic_ack(run_end, multiple=True)
            for tag in finished:
                if tag > run_end:
                    await channel.basic_ack(tag)
        except _SETTLE_ERRORS as exc:
            _settle_failed(exc)
        # Settled, or their channel is gone (the broker redelivers them, the runner
        # absorbs the duplicates): either way no longer ours to ack.
        self._forget(channel, [*(t for t in unsettled if t <= run_end), *finished])

    def _forget(self, channel: aiormq.abc.AbstractChannel, tags: Sequence[int]) -> None:
        unsettled = self._unsettled.get(channel)
        if unsettled is None:
            return
        for tag in tags:
            unsettled.pop(tag, None)
        if not unsettled:
            del self._unsettled[channel]

    async def drain(self, grace_s: float, handback_s: float) -> None:
        """Stop taking work and let what runs finish, hand it back or give it up."""
        await asyncio.gather(*(self._cancel(lane) for lane in self._lanes))
        # What waits for a slot never starts: handed back at once (and what still
        # arrives before the cancels took effect).
        self._gate.close()
        WAITING.set(0)
        if self._tasks:
            log.info("draining", extra={"in_flight": len(self._tasks), "grace_s": grace_s})
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self._tasks:
            for running in list(self._runner.running.values()):
                running.stop(StopReason.SHUTDOWN)
            await asyncio.wait(set(self._tasks), timeout=handback_s)
        for task in set(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _cancel(self, lane: _Lane) -> None:
        if lane.tag is None:
            return
        try:
            # Bounded: while the broker is down the robust channel would wait for the
            # reconnect forever, and a stopping worker must still stop.
            await asyncio.wait_for(lane.queue.cancel(lane.tag), self._timeout)
        except _CONSUMER_CALL_ERRORS as exc:
            log.info(
                "consumer cancel failed; closing the channel stops it",
                extra={"queue": lane.queue.name, "error": repr(exc)},
            )
        lane.tag = None


def _take_directly(lane: _Lane, consumers: dict[str, Any]) -> None:
    """Have the lane's consumer on its current channel hand deliveries to ``direct``
    (aiormq calls a consumer with each delivery, in a task it makes)."""
    if lane.tag in consumers and consumers[lane.tag] is not lane.direct:
        consumers[lane.tag] = lane.direct


def _settle_failed(exc: BaseException) -> None:
    # The channel this came on is gone (broker restart): the broker redelivers the
    # message on a new channel, and the runner absorbs the duplicate.
    ACK_FAILURES.inc()
    log.info(
        "could not settle a delivery; its redelivery will be absorbed",
        extra={"error": repr(exc)},
    )
