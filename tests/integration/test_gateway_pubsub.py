"""The hub's own Redis subscriber (services/ws_gateway/pubsub.py) against real Redis:
the messages of a burst arrive whole and in order, a password is sent, and a Redis that
closes the connection, refuses it or stops answering ends the subscription."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest
from redis.asyncio import Redis

from services.ws_gateway.pubsub import PatternSubscriber, SubscriberLost
from tests.conftest import Deployment
from tests.support import eventually, free_port, private_redis, redis_up, timeout

Received = list[tuple[bytes, bytes]]


async def test_a_pipelined_burst_arrives_whole_in_order_and_only_the_pattern(
    deployment: Deployment, redis: Redis
) -> None:
    got: Received = []
    pattern = f"{deployment.namespace}:pubsub:*"
    subscriber = await PatternSubscriber.open(
        deployment.redis_url,
        pattern,
        lambda channel, data: got.append((channel, data)),
        io_timeout=5,
        idle_s=10,
    )
    try:
        # Large enough that Redis sends it in many socket writes, and messages straddle
        # the reads.
        sent = [
            (f"{deployment.namespace}:pubsub:{i % 7}".encode(), f"{i}:{'x' * (i % 300)}".encode())
            for i in range(5000)
        ]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.publish(f"{deployment.namespace}:other", b"not ours")
            for channel, data in sent:
                pipe.publish(channel, data)
            await pipe.execute()
        await eventually(lambda: _at_least(got, len(sent)), what="the burst")
        await asyncio.sleep(0.1)  # nothing more comes: the other channel's message
        assert got == sent
    finally:
        subscriber.close()


async def _at_least(got: Received, n: int) -> bool:
    return len(got) >= n


async def test_a_password_is_sent_and_a_refusal_ends_the_opening() -> None:
    port = free_port()
    secret = uuid.uuid4().hex
    with private_redis(port, "--requirepass", secret):
        url = f"redis://:{secret}@127.0.0.1:{port}/0"
        await eventually(lambda: redis_up(url), what="private redis up")
        with pytest.raises(SubscriberLost, match=r"WRONGPASS|invalid"):
            await PatternSubscriber.open(
                f"redis://:wrong@127.0.0.1:{port}/0", "x:*", _ignore, io_timeout=5, idle_s=10
            )
        got: Received = []
        subscriber = await PatternSubscriber.open(
            url, "x:*", lambda c, d: got.append((c, d)), io_timeout=5, idle_s=10
        )
        try:
            client = Redis.from_url(url)
            try:
                await client.publish("x:1", b"hello")
            finally:
                await client.aclose()
            await eventually(lambda: _at_least(got, 1), what="the message")
            assert got == [(b"x:1", b"hello")]
        finally:
            subscriber.close()


async def test_a_closed_connection_ends_the_watch() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with private_redis(port) as server:
        await eventually(lambda: redis_up(url), what="private redis up")
        subscriber = await PatternSubscriber.open(url, "x:*", _ignore, io_timeout=5, idle_s=60)
        watch = asyncio.create_task(subscriber.watch(), name="watch")
        server.terminate()
        server.wait(timeout=10)
        with pytest.raises(SubscriberLost, match="connection lost"):
            await asyncio.wait_for(watch, timeout(10))
        subscriber.close()


async def test_a_redis_that_stops_answering_is_noticed_by_its_ping() -> None:
    """Silence alone is no failure (an idle namespace publishes nothing), so a quiet
    connection is PINGed; no answer within the I/O timeout ends the subscription."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with private_redis(port) as server:
        await eventually(lambda: redis_up(url), what="private redis up")
        subscriber = await PatternSubscriber.open(url, "x:*", _ignore, io_timeout=0.5, idle_s=0.5)
        watch = asyncio.create_task(subscriber.watch(), name="watch")
        # Quiet but alive: the PINGs are answered and the watch goes on.
        await asyncio.sleep(1.6)
        assert not watch.done()
        server.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(SubscriberLost, match="PING"):
                await asyncio.wait_for(watch, timeout(10))
        finally:
            server.send_signal(signal.SIGCONT)
            subscriber.close()


def _ignore(channel: bytes, data: bytes) -> None:
    del channel, data
