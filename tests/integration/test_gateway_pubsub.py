"""The hub's own Redis subscriber (services/ws_gateway/pubsub.py) against real Redis:
the messages of a burst arrive whole and in order, a password is sent, and a Redis that
closes the connection, refuses it or stops answering ends the subscription."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.ws_gateway.pubsub import PatternSubscriber, SubscriberLost
from tests.conftest import Deployment
from tests.faults.private import PrivateRedis
from tests.support import eventually, free_port, timeout

Received = list[tuple[bytes, bytes]]


@contextlib.asynccontextmanager
async def _subscribed(url: str, pattern: str) -> AsyncIterator[Received]:
    """The messages of a subscription open for the block, as they arrive."""
    got: Received = []
    subscriber = await PatternSubscriber.open(
        url, pattern, lambda c, d: got.append((c, d)), io_timeout=5, idle_s=10
    )
    try:
        yield got
    finally:
        subscriber.close()


async def test_a_pipelined_burst_arrives_whole_in_order_and_only_the_pattern(
    deployment: Deployment, redis: Redis
) -> None:
    async with _subscribed(deployment.redis_url, f"{deployment.namespace}:pubsub:*") as got:
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


async def _at_least(got: Received, n: int) -> bool:
    return len(got) >= n


async def test_a_password_is_sent_and_a_refusal_ends_the_opening() -> None:
    secret = uuid.uuid4().hex
    with PrivateRedis("--requirepass", secret) as server:
        url = f"redis://:{secret}@127.0.0.1:{server.port}/0"
        with pytest.raises(SubscriberLost, match=r"WRONGPASS|invalid"):
            await PatternSubscriber.open(
                f"redis://:wrong@127.0.0.1:{server.port}/0", "x:*", _ignore, io_timeout=5, idle_s=10
            )
        assert await _one_message_through(url, url) == [(b"x:1", b"hello")]


Watched = tuple[PrivateRedis, "asyncio.Task[None]"]


@contextlib.asynccontextmanager
async def _watched(io_timeout: float, idle_s: float) -> AsyncIterator[Watched]:
    """A private Redis, and the watch of a subscription to it."""
    with PrivateRedis() as server:
        subscriber = await PatternSubscriber.open(
            server.url, "x:*", _ignore, io_timeout=io_timeout, idle_s=idle_s
        )
        watch = asyncio.create_task(subscriber.watch(), name="watch")
        try:
            yield server, watch
        finally:
            subscriber.close()


async def test_a_closed_connection_ends_the_watch() -> None:
    async with _watched(io_timeout=5, idle_s=60) as (server, watch):
        server.stop()
        with pytest.raises(SubscriberLost, match="connection lost"):
            await asyncio.wait_for(watch, timeout(10))


async def test_a_redis_that_stops_answering_is_noticed_by_its_ping() -> None:
    """Silence alone is no failure (an idle namespace publishes nothing), so a quiet
    connection is PINGed; no answer within the I/O timeout ends the subscription."""
    async with _watched(io_timeout=0.5, idle_s=0.5) as (server, watch):
        # Quiet but alive: the PINGs are answered and the watch goes on.
        await asyncio.sleep(1.6)
        assert not watch.done()
        server.pause()
        try:
            with pytest.raises(SubscriberLost, match="PING"):
                await asyncio.wait_for(watch, timeout(10))
        finally:
            server.resume()


async def _one_message_through(url: str, publish_url: str) -> Received:
    async with _subscribed(url, "x:*") as got:
        client = Redis.from_url(publish_url)
        try:
            await client.publish("x:1", b"hello")
        finally:
            await client.aclose()
        await eventually(lambda: _at_least(got, 1), what="the message")
    return got


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    with PrivateRedis("--unixsocket", str(path), "--unixsocketperm", "700") as server:
        assert await _one_message_through(f"unix://{path}", server.url) == [(b"x:1", b"hello")]


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_a_tls_url_verifies_the_server(self_signed: tuple[Path, Path]) -> None:
    """rediss:// is TLS with the server's certificate checked: against the URL's
    ssl_ca_certs it passes, against the system's authorities a self-signed one fails."""
    cert, key = self_signed
    tls_port = free_port()
    # Clients must show a certificate too (Redis's default): the URL's client certificate
    # options must reach the handshake, as they do for redis-py's connections.
    tls = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "yes")  # fmt: skip
    with PrivateRedis(*tls):
        url = (
            f"rediss://127.0.0.1:{tls_port}/0"
            f"?ssl_ca_certs={cert}&ssl_certfile={cert}&ssl_keyfile={key}"
        )
        assert await _one_message_through(url, url) == [(b"x:1", b"hello")]
        with pytest.raises(ssl.SSLCertVerificationError):
            await PatternSubscriber.open(
                f"rediss://127.0.0.1:{tls_port}/0", "x:*", _ignore, io_timeout=5, idle_s=10
            )


async def test_a_message_larger_than_any_socket_read_arrives(
    deployment: Deployment, redis: Redis
) -> None:
    async with _subscribed(deployment.redis_url, f"{deployment.namespace}:big:*") as got:
        body = b"x" * (3 << 20)
        await redis.publish(f"{deployment.namespace}:big:1", body)
        await eventually(lambda: _at_least(got, 1), what="the large message")
        assert got == [(f"{deployment.namespace}:big:1".encode(), body)]


async def test_a_failing_dispatch_ends_the_subscription_for_a_resync(
    deployment: Deployment, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception out of the dispatch is a bug, but it must end in a new subscription
    (the hub resyncs its listeners), not in a reader that silently skips messages."""

    def broken(channel: bytes, data: bytes) -> None:
        raise RuntimeError("dispatch bug")

    pattern = f"{deployment.namespace}:broken:*"
    subscriber = await PatternSubscriber.open(
        deployment.redis_url, pattern, broken, io_timeout=5, idle_s=10
    )
    watch = asyncio.create_task(subscriber.watch(), name="watch")
    try:
        await redis.publish(f"{deployment.namespace}:broken:1", b"x")
        with pytest.raises(SubscriberLost, match="dispatch bug"):
            await asyncio.wait_for(watch, timeout(10))
        assert "reading the redis subscription failed" in caplog.text
    finally:
        subscriber.close()


async def test_a_server_that_never_answers_times_the_opening_out_and_leaves_nothing() -> None:
    """A port that accepts but does not speak (a stopped Redis behind a proxy, say):
    the opening gives up after the I/O timeout, with no read left pending."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        before = set(asyncio.all_tasks())
        with pytest.raises(TimeoutError):
            await PatternSubscriber.open(
                f"redis://127.0.0.1:{port}/0", "x:*", _ignore, io_timeout=0.3, idle_s=10
            )
        await asyncio.sleep(0)  # a cancelled read finishes on the next turn
        assert [t for t in asyncio.all_tasks() - before if not t.done()] == []
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def _ignore(channel: bytes, data: bytes) -> None:
    del channel, data
