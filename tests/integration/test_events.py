"""EventSink against the real Redis: what reaches the stream, the channel and the expiry,
and how refusals are told apart from duplicates."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import UUID, uuid4

from redis.asyncio import Redis

from services.ws_gateway.streams import StreamReader
from shared.events import EventSink
from shared.schemas import ProgressEvent, TaskState, parse_event
from tests.conftest import Deployment
from tests.faults.private import PrivateRedis
from tests.support import timeout


def _event(task_id: UUID, seq: int, state: TaskState = TaskState.RUNNING) -> ProgressEvent:
    return ProgressEvent(
        task_id=task_id, seq=seq, state=state, progress=seq / 10, ts=datetime.now(UTC)
    )


def _sink(redis: Redis, deployment: Deployment) -> EventSink:
    return EventSink(redis, deployment.wire, retention_s=600, maxlen=1000)


async def _stream_seqs(redis: Redis, deployment: Deployment, task_id: UUID) -> list[int]:
    entries = await redis.xrange(deployment.wire.event_stream(task_id))
    return [parse_event(fields[b"e"]).seq for _, fields in entries]


async def test_events_reach_stream_and_channel_in_order(
    redis: Redis, deployment: Deployment
) -> None:
    """Live events are appended and published; backfill is appended only; the stream
    gets an expiry; events of several tasks in one batch each go to their own stream."""
    sink = _sink(redis, deployment)
    a, b = uuid4(), uuid4()
    pubsub = redis.pubsub()
    await pubsub.subscribe(deployment.wire.event_channel(a), deployment.wire.event_channel(b))
    for _ in range(2):
        assert await pubsub.get_message(timeout=1) is not None  # the subscribe replies
    ok = await asyncio.gather(
        sink.emit([_event(a, 2)], backfill=[_event(a, 1, TaskState.QUEUED)]),
        sink.emit([_event(b, 1, TaskState.QUEUED)]),
        sink.emit([_event(a, 3), _event(a, 4, TaskState.SUCCEEDED)]),
    )
    assert ok == [True, True, True]
    assert await _stream_seqs(redis, deployment, a) == [1, 2, 3, 4]
    assert await _stream_seqs(redis, deployment, b) == [1]
    published: list[tuple[bytes, int]] = []
    while (msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)) is not None:
        published.append((msg["channel"], parse_event(msg["data"]).seq))
    channel_a = deployment.wire.event_channel(a).encode()
    assert [seq for channel, seq in published if channel == channel_a] == [2, 3, 4]
    assert len(published) == 4
    ttl = await redis.pttl(deployment.wire.event_stream(a))
    assert 0 < ttl <= 600_000
    await pubsub.aclose()
    await redis.delete(deployment.wire.event_stream(a), deployment.wire.event_stream(b))


async def test_a_duplicate_seq_is_dropped_not_counted_as_failure(
    redis: Redis, deployment: Deployment
) -> None:
    """Writing a seq again (a redelivery, a backfill someone else wrote) succeeds and
    leaves the stream with that seq once."""
    sink = _sink(redis, deployment)
    task = uuid4()
    assert await sink.emit([_event(task, 1), _event(task, 2)])
    assert await sink.emit([_event(task, 2), _event(task, 3)], backfill=[_event(task, 1)])
    assert await _stream_seqs(redis, deployment, task) == [1, 2, 3]
    assert sink.breaker.allow()
    await redis.delete(deployment.wire.event_stream(task))


async def test_a_refused_write_returns_false_and_spares_the_rest(
    redis: Redis, deployment: Deployment
) -> None:
    """A stream key Redis cannot append to fails the batch's emit (the caller learns it)
    while the other events of the batch are still written, and Redis is not treated as
    down."""
    sink = _sink(redis, deployment)
    broken, fine = uuid4(), uuid4()
    await redis.set(deployment.wire.event_stream(broken), b"not a stream")
    ok = await sink.emit([_event(broken, 1), _event(fine, 1)])
    assert ok is False
    assert await _stream_seqs(redis, deployment, fine) == [1]
    assert sink.breaker.allow()
    await redis.delete(deployment.wire.event_stream(broken), deployment.wire.event_stream(fine))


async def test_the_script_is_loaded_again_after_redis_forgot_it(deployment: Deployment) -> None:
    """After SCRIPT FLUSH (as after a Redis restart) the next emit still writes. On a
    private Redis: flushing the shared one's scripts would disturb other runs."""
    with PrivateRedis() as server:
        client = Redis.from_url(server.url)
        try:
            sink = _sink(client, deployment)
            task = uuid4()
            assert await sink.emit([_event(task, 1)])
            await client.script_flush()
            assert await sink.emit([_event(task, 2)])
            assert await _stream_seqs(client, deployment, task) == [1, 2]
        finally:
            await client.aclose()


async def test_concurrent_stream_reads_each_get_their_own_events(
    redis: Redis, deployment: Deployment
) -> None:
    """The gateway's StreamReader: reads of the same moment share a pipeline, and each
    caller still gets its own stream from its own seq, paged past 500 entries; a missing
    stream reads as empty."""
    sink = EventSink(redis, deployment.wire, retention_s=600, maxlen=5000)
    reader = StreamReader(redis, deployment.wire, max_events=5000)
    long, short, missing = uuid4(), uuid4(), uuid4()
    assert await sink.emit(
        [
            ProgressEvent(
                task_id=long, seq=seq, state=TaskState.RUNNING, progress=0.5, ts=datetime.now(UTC)
            )
            for seq in range(1, 1201)
        ]
    )
    assert await sink.emit([_event(short, seq) for seq in range(1, 4)])
    try:
        got = await asyncio.gather(
            reader.after(long, 0),
            reader.after(long, 1150),
            reader.after(short, 1),
            reader.after(missing, 0),
            *(reader.after(short, 0) for _ in range(200)),
        )
    finally:
        await reader.aclose()
        await redis.delete(deployment.wire.event_stream(long), deployment.wire.event_stream(short))
    assert [e.seq for e in got[0]] == list(range(1, 1201))
    assert [e.seq for e in got[1]] == list(range(1151, 1201))
    assert [e.seq for e in got[2]] == [2, 3]
    assert got[3] == []
    assert all([e.seq for e in g] == [1, 2, 3] for g in got[4:])


async def test_an_announced_event_is_published_and_leaves_the_stream_alone(
    redis: Redis, deployment: Deployment
) -> None:
    """announce() reaches live subscribers only: the events its writer may still append
    before it (lower seqs) are then not refused by the stream."""
    sink = _sink(redis, deployment)
    task_id = uuid4()
    pubsub = redis.pubsub()
    await pubsub.subscribe(deployment.wire.event_channel(task_id))
    assert await pubsub.get_message(timeout=timeout(1)) is not None  # the subscribe reply
    assert await sink.announce(_event(task_id, 4, TaskState.SUCCEEDED))
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout(1))
    assert msg is not None and parse_event(msg["data"]).seq == 4
    assert await _stream_seqs(redis, deployment, task_id) == []
    assert await sink.emit([_event(task_id, 2), _event(task_id, 3)])
    assert await _stream_seqs(redis, deployment, task_id) == [2, 3]
    await pubsub.aclose()
    await redis.delete(deployment.wire.event_stream(task_id))
    await sink.aclose()
