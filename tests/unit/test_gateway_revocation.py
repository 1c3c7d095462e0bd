"""The gateway's revocation check without I/O: which streams a revoked key stops, and a
check that fails waits for the next."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest

from services.ws_gateway.keystates import KeyStates
from services.ws_gateway.metrics import GatewayMetrics
from services.ws_gateway.revocation import Holders, Revoker
from tests.support import eventually, until


class _Stream:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


class _Keys:
    def __init__(self, active: set[str]) -> None:
        self.active = active
        self.asked: list[list[str]] = []
        self.failures = 0

    async def active_keys(self, key_ids: Sequence[str]) -> set[str]:
        self.asked.append(sorted(key_ids))
        if self.failures:
            self.failures -= 1
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost")
        return self.active & set(key_ids)


def _metrics() -> GatewayMetrics:
    return GatewayMetrics(connections=lambda: 0.0, subscriptions=lambda: 0.0)


async def test_a_check_stops_the_streams_of_revoked_keys_only_in_one_query() -> None:
    """One query for all the keys in use (none while no stream is held); the streams
    of a key it no longer finds active are stopped once and let go of, so that their
    handlers can tell a revocation from an end of their own; the others stay held. A
    key's streams share one copy of its id."""
    holders: Holders[_Stream] = Holders()
    keys = _Keys(active={"kept"})
    metrics = _metrics()
    revoker = Revoker(holders, keys, metrics, check_s=60)
    assert await revoker.check() == 0 and keys.asked == []
    a, b, c = _Stream(), _Stream(), _Stream()
    gone = holders.add("".join(["go", "ne"]), a)
    assert holders.add("".join(["go", "ne"]), b) is gone  # one string per key
    holders.add("kept", c)
    assert await revoker.check() == 2
    assert keys.asked == [["gone", "kept"]]
    assert (a.stops, b.stops, c.stops) == (1, 1, 0)
    assert not holders.discard("gone", a)  # taken by the revocation
    assert await revoker.check() == 0 and a.stops == 1
    assert keys.asked[-1] == ["kept"]
    assert holders.discard("kept", c)  # ended on its own
    assert holders.key_ids() == []
    assert b"longhaul_gateway_revoked_total 2.0" in metrics.render()


async def test_a_failed_check_is_tried_again_at_the_next_period() -> None:
    """The database away for one check: the loop runs on, and the next one stops the
    revoked key's stream."""
    holders: Holders[_Stream] = Holders()
    keys = _Keys(active=set())
    keys.failures = 1
    stream = _Stream()
    holders.add("gone", stream)
    loop = asyncio.create_task(Revoker(holders, keys, _metrics(), check_s=0.01).run())
    try:
        await eventually(until(lambda: stream.stops == 1), within=5, what="the second check")
        assert len(keys.asked) >= 2 and not loop.done()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_key_states_answer_from_the_checks_for_a_while_and_keep_a_bounded_few() -> None:
    """An answer the check read is given without a query until it is ttl_s old; a key
    not seen is read once for the opens that ask at the same moment; a failed read is
    not kept; past max_keys the oldest answer goes, and its key is read again."""
    now = [0.0]
    keys = _Keys(active={"a", "b", "c"})
    states = KeyStates(keys, ttl_s=5, max_keys=2, clock=lambda: now[0])
    assert await states.active_keys(["a", "gone"]) == {"a"}  # the revocation check's
    now[0] = 4.9
    assert await states.key_active("a") and not await states.key_active("gone")
    assert keys.asked == [["a", "gone"]]
    now[0] = 5.0
    keys.active.discard("a")  # revoked meanwhile
    assert not await states.key_active("a")
    assert keys.asked[-1] == ["a"]
    keys.failures = 1
    with pytest.raises(asyncpg.PostgresConnectionError):
        await states.key_active("b")
    assert await asyncio.gather(*(states.key_active("b") for _ in range(5))) == [True] * 5
    assert keys.asked[-2:] == [["b"], ["b"]]
    asked = len(keys.asked)
    assert await states.key_active("b") and len(keys.asked) == asked  # kept
    # At most two kept: "c" read drops "a", the oldest, though its answer is fresh.
    assert await states.key_active("c")
    assert not await states.key_active("a")
    assert keys.asked[-2:] == [["c"], ["a"]]
