"""The services' Redis client against the real Redis: a burst of concurrent calls
larger than its connection pool waits for a connection instead of failing.

Caught in the benchmark: 1,000 WebSocket clients subscribing at once made the gateway
read streams and redeem tokens concurrently; past redis-py's 100 pooled connections
each further call raised at once, so connections were refused and catch-ups fell back
to PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.events import EventSink
from shared.redis import create_client
from shared.schemas import ProgressEvent, TaskState
from shared.wire import Wire
from tests.conftest import Deployment
from tests.faults.private import PrivateRedis
from tests.support import eventually


async def test_a_burst_beyond_the_pool_waits_for_connections(deployment: Deployment) -> None:
    client = create_client(deployment.redis_url, 10.0)
    key = f"{deployment.namespace}:burst"
    try:
        # BLPOP holds its connection for the whole timeout, so the calls overlap for sure.
        results = await asyncio.gather(
            *(client.blpop([f"{key}:{i}"], timeout=0.2) for i in range(300)),
            return_exceptions=True,
        )
    finally:
        await client.aclose()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert results == [None] * 300


# A script that counts its runs and, on its first, keeps Redis busy for ARGV[1] seconds:
# the reply to that first run comes after the client's timeout.
_SLOW_FIRST_RUN = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  local t = redis.call('TIME')
  local start = t[1] * 1e6 + t[2]
  repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > ARGV[1] * 1e6
end
return n
"""


async def test_a_timed_out_script_is_not_run_again(redis_server: PrivateRedis) -> None:
    """The command may have run when its reply is late: a retry would run it twice (a
    rate limiter's token taken twice, events appended twice)."""
    client = create_client(redis_server.url, 0.5)
    try:
        script = client.register_script(_SLOW_FIRST_RUN)
        await client.ping()  # connected, script cache warm-up aside
        with pytest.raises(RedisTimeoutError):
            await script(keys=["runs"], args=[0.8])
        await asyncio.sleep(0.6)  # the first run has finished
        assert await client.get("runs") == b"1"
    finally:
        await client.aclose()


async def test_a_call_to_a_hung_redis_ends_within_its_timeout(
    redis_server: PrivateRedis,
) -> None:
    """SIGSTOP: connects succeed (the kernel accepts) and nothing answers. Retries,
    reconnects and the pool's wait used to add up to several times the timeout."""
    pooled = create_client(redis_server.url, 1.0)
    fresh = create_client(redis_server.url, 1.0)
    try:
        await pooled.ping()
        redis_server.pause()
        try:
            for client in (pooled, fresh):
                started = time.monotonic()
                with pytest.raises((RedisError, TimeoutError)):
                    await client.incr("hung")
                assert time.monotonic() - started < 1.5  # it was 2 s and more
        finally:
            redis_server.resume()
        await asyncio.sleep(0.2)
        assert await pooled.get("hung") in (None, b"1")
    finally:
        await pooled.aclose()
        await fresh.aclose()


# Keeps Redis busy for ARGV[1] seconds, then returns 1.
_BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1e6 + t[2]
repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > ARGV[1] * 1e6
return 1
"""


async def test_a_pipeline_ends_within_its_timeout_its_wait_for_a_connection_included(
    redis_server: PrivateRedis,
) -> None:
    """A pipeline waited for a pooled connection up to its timeout, then for its reply up
    to its timeout again: the stream reads of a burst of subscribers could take twice
    as long as a call may."""
    client = create_client(redis_server.url, 2.0, max_connections=1)
    observer = create_client(redis_server.url, 2.0)

    async def blocked() -> bool:
        return any(c["cmd"] == "blpop" for c in await observer.client_list())

    try:
        # The pool's one connection is taken for 1.2 s, and the pipeline's reply comes
        # 1.2 s after it is sent: each within the timeout, not both.
        holder = asyncio.create_task(client.blpop(["nothing"], timeout=1.2))
        await eventually(blocked, what="BLPOP holding the pool's connection")
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            async with client.pipeline(transaction=False) as pipe:
                pipe.eval(_BUSY, 0, 1.2)
                await pipe.execute()
        assert time.monotonic() - started < 2.5
        assert await holder is None
        # The cut pipeline's connection was closed, not pooled with its reply unread.
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("k", "v")
            pipe.get("k")
            assert await pipe.execute() == [True, b"v"]
    finally:
        await client.aclose()
        await observer.aclose()


async def test_a_script_redis_lost_is_run_within_its_timeout_its_reload_included(
    redis_server: PrivateRedis,
) -> None:
    """A script Redis does not hold (a restart) is EVALSHA, SCRIPT LOAD and EVALSHA
    again: each had its own timeout, so the call could take up to three times it."""
    client = create_client(redis_server.url, 2.0)
    script = client.register_script(_BUSY)
    try:
        await client.ping()
        # The NOSCRIPT reply comes 1.2 s after the EVALSHA, and the script then runs
        # 1.2 s: each within the timeout, not both.
        redis_server.pause()
        asyncio.get_running_loop().call_later(1.2, redis_server.resume)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await script(args=[1.2])
        assert time.monotonic() - started < 2.5
        assert await script(args=[0]) == 1  # loaded now
    finally:
        redis_server.resume()  # a failed test must not leave it stopped
        await client.aclose()


async def test_a_pooled_connection_survives_a_redis_restart(redis_server: PrivateRedis) -> None:
    client = create_client(redis_server.url, 2.0)
    try:
        await client.set("k", "1")
        redis_server.stop()
        redis_server.start()
        # A running service's loop sees the old connection close, and the pool opens a
        # new one. A connection whose server vanished without closing it (a failover)
        # fails its next command instead: it may have been sent, so it is not retried
        # unless declared idempotent (the tests below).
        await asyncio.sleep(0.2)
        assert await client.incr("k") == 1  # the restarted Redis has no data
    finally:
        await client.aclose()


def _drop_connections(server: PrivateRedis) -> None:
    """Closes every client's connection from Redis' side, blocking the event loop: the
    client has not seen them close when it writes its next command, as with a server
    that vanished without closing them (a failover). A loop left to run would notice
    the close, and the pool would replace the connection before using it."""
    subprocess.run(
        ["redis-cli", "-p", str(server.port), "CLIENT", "KILL", "TYPE", "normal"],
        check=True,
        capture_output=True,
    )


def _event(task_id: UUID, seq: int) -> ProgressEvent:
    return ProgressEvent(
        task_id=task_id, seq=seq, state=TaskState.RUNNING, progress=0.5, ts=datetime.now(UTC)
    )


async def test_an_event_write_is_retried_on_a_connection_found_dead_after_it(
    redis_server: PrivateRedis,
) -> None:
    """The event script is harmless to run twice, so a pooled connection that fails
    once the script was written to it is replaced and the script run again."""
    client = create_client(redis_server.url, 2.0)
    wire = Wire("lhtest")
    sink = EventSink(client, wire, retention_s=600, maxlen=1000)
    task_id = uuid4()
    try:
        assert await sink.emit([_event(task_id, 1)])  # one pooled connection
        _drop_connections(redis_server)
        assert await sink.emit([_event(task_id, 2)])
        entries = await client.xrange(wire.event_stream(task_id))
        assert [entry_id for entry_id, _ in entries] == [b"1-0", b"2-0"]
    finally:
        await sink.aclose()
        await client.aclose()


async def test_an_announce_is_retried_on_a_connection_found_dead_after_it(
    redis_server: PrivateRedis,
) -> None:
    """Publishing an event twice is harmless (clients drop it by seq), so a pooled
    connection that fails once the PUBLISH was written to it is replaced and the
    PUBLISH sent again."""
    client = create_client(redis_server.url, 2.0)
    wire = Wire("lhtest")
    sink = EventSink(client, wire, retention_s=600, maxlen=1000)
    task_id = uuid4()
    listener = client.pubsub()  # a pubsub connection: not dropped below
    try:
        await listener.subscribe(wire.event_channel(task_id))
        assert await sink.announce(_event(task_id, 1))  # one pooled connection
        _drop_connections(redis_server)
        assert await sink.announce(_event(task_id, 2))
        seqs: list[int] = []
        async with asyncio.timeout(10):
            while len(seqs) < 2:
                # None for the subscribe's confirmation, too.
                message = await listener.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    seqs.append(orjson.loads(message["data"])["seq"])
        assert seqs == [1, 2]
    finally:
        await listener.aclose()
        await sink.aclose()
        await client.aclose()


@pytest.mark.parametrize("kind", ["incr", "script"])
async def test_a_command_not_declared_idempotent_is_not_run_again(
    redis_server: PrivateRedis, kind: str
) -> None:
    """An INCR, or a script such as the rate limiter's, fails once when its connection
    fails after the write: it may have run, and running it twice is not harmless."""
    client = create_client(redis_server.url, 2.0)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    run: Callable[[], Awaitable[Any]] = {
        "incr": lambda: client.incr("runs"),
        "script": lambda: script(keys=["runs"]),
    }[kind]
    try:
        assert await run() == 1  # one pooled connection, the script loaded
        _drop_connections(redis_server)
        with pytest.raises(RedisConnectionError):
            await run()
        # Redis closed that connection before the command came: it did not run.
        assert await run() == 2
    finally:
        await client.aclose()
