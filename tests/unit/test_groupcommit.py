"""shared.groupcommit: concurrent callers share a write, each gets its own outcome."""

from __future__ import annotations

import asyncio
import gc

import pytest

from shared.groupcommit import GroupCommit


class Recorder:
    """A write that records its batches and holds each one until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def write(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.release.wait()
        if bad := [i for i in items if i < 0]:
            raise ValueError(f"bad {bad[0]}")  # one bad item fails its statement
        return [i * 10 for i in items]


async def test_a_lingering_writer_takes_items_that_come_soon_after() -> None:
    rec = Recorder()
    rec.release.set()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test", linger_s=0.2)
    first = asyncio.create_task(group.submit(1))
    for _ in range(3):
        await asyncio.sleep(0)  # without the linger, [1] would be written by now
    second = asyncio.create_task(group.submit(2))
    assert (await first, await second) == (10, 20)
    assert rec.batches == [[1, 2]]
    await group.aclose()


async def test_a_lingering_writer_stops_waiting_once_enough_items_wait() -> None:
    """With ``enough``, the linger ends as soon as that many items wait: the acks of a
    full prefetch window go out at once, since nothing more can come before them."""
    rec = Recorder()
    rec.release.set()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test", linger_s=30, enough=3)
    calls = [asyncio.create_task(group.submit(i)) for i in (1, 2)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert rec.batches == []  # two of three: still lingering
    calls.append(asyncio.create_task(group.submit(3)))
    results = await asyncio.wait_for(asyncio.gather(*calls), 5)  # not after 30 s
    assert results == [10, 20, 30]
    assert rec.batches == [[1, 2, 3]]
    await group.aclose()


async def test_callers_arriving_during_a_write_share_the_next_one() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test")
    first = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0)  # the first batch is being written
    rest = [asyncio.create_task(group.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    rec.release.set()
    assert await first == 10
    assert [await t for t in rest] == [20, 30, 40]
    assert rec.batches == [[1], [2, 3, 4]]
    await group.aclose()


async def test_an_item_failure_reaches_only_its_caller() -> None:
    """With alone_on, a batch failing for one item is written again one by one."""
    rec = Recorder()
    rec.release.set()
    group: GroupCommit[int, int] = GroupCommit(
        rec.write, name="test", alone_on=lambda e: isinstance(e, ValueError)
    )
    results = await asyncio.gather(
        group.submit(1), group.submit(-2), group.submit(3), return_exceptions=True
    )
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"
    assert rec.batches == [[1, -2, 3], [1], [-2], [3]]


async def test_without_alone_on_the_whole_batch_fails() -> None:
    rec = Recorder()
    rec.release.set()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test")
    results = await asyncio.gather(group.submit(1), group.submit(-2), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)


async def test_items_with_one_key_never_share_a_batch() -> None:
    rec = Recorder()
    rec.release.set()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test", key=lambda i: i % 10)
    results = await asyncio.gather(*(group.submit(i) for i in (1, 11, 2, 21, 3)))
    assert results == [10, 110, 20, 210, 30]
    # Later items of a key wait for the next batch, in their order of arrival.
    assert rec.batches == [[1, 2, 3], [11], [21]]


async def test_a_failed_write_fails_its_batch_and_the_next_batch_still_runs() -> None:
    calls: list[list[int]] = []

    async def write(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("down")
        return items

    group: GroupCommit[int, int] = GroupCommit(write, name="test")
    with pytest.raises(ConnectionError):
        await group.submit(1)
    assert await group.submit(2) == 2


async def test_a_cancelled_caller_does_not_cancel_the_batch_of_others() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test")
    quitter = asyncio.create_task(group.submit(1))
    stayer = asyncio.create_task(group.submit(2))
    await asyncio.sleep(0)
    quitter.cancel()
    await asyncio.sleep(0)
    rec.release.set()
    assert await stayer == 20
    assert quitter.cancelled()
    assert rec.batches == [[1, 2]]


async def test_max_batch_splits_a_crowd() -> None:
    rec = Recorder()
    rec.release.set()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test", max_batch=2)
    assert await asyncio.gather(*(group.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert [len(b) for b in rec.batches] == [2, 2, 1]


async def test_added_items_are_written_together_and_awaited_by_aclose(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Items nobody waits for linger into one batch; aclose waits for it; a failed
    write of such items raises nowhere (no 'exception never retrieved' either)."""
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test", linger_s=0.05)
    group.add([1, 2])
    await asyncio.sleep(0)
    group.add([3])
    closing = asyncio.create_task(group.aclose())
    await asyncio.sleep(0.1)
    assert not closing.done()  # the batch is still being written
    rec.release.set()
    await closing
    assert rec.batches == [[1, 2, 3]]
    group.add([-1])
    await group.aclose()
    assert rec.batches[-1] == [-1]
    gc.collect()  # an unretrieved exception is reported when its future is collected
    assert "never retrieved" not in caplog.text


async def test_cancelling_a_caller_of_aclose_does_not_cancel_the_writes_of_others() -> None:
    """A stopping service that gives up on aclose() (its own timeout) must not take the
    lingering writer down with it: the submitters would wait forever."""
    rec = Recorder()
    rec.release.set()
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test", linger_s=0.2)
    submitted = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0)  # the writer is lingering now
    closing = asyncio.create_task(group.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert await asyncio.wait_for(submitted, 5) == 10
    assert rec.batches == [[1]]


async def test_a_cancelled_writer_releases_every_waiting_caller() -> None:
    """Callers whose items wait for the next batch when the writer is cancelled (the
    loop stopping) are cancelled too, not left waiting for a write that never comes."""
    rec = Recorder()  # holds the first batch until released
    group: GroupCommit[int, int] = GroupCommit(rec.write, name="test")
    first = asyncio.create_task(group.submit(1))
    await asyncio.sleep(0)
    second = asyncio.create_task(group.submit(2))  # waits for the next batch
    await asyncio.sleep(0)
    assert rec.batches == [[1]]
    writer = next(t for t in asyncio.all_tasks() if t.get_name() == "test")
    writer.cancel()
    done, _ = await asyncio.wait({first, second}, timeout=5)
    assert done == {first, second}
    assert first.cancelled() and second.cancelled()
