"""Pure shared modules: the state machine, backoff, UUIDv7 ids, API keys, failpoints,
single-flight calls."""

from __future__ import annotations

import asyncio
import itertools
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest

from shared import keys, wstokens
from shared.backoff import Backoff
from shared.breaker import Breaker
from shared.errors import DependencyError
from shared.failpoints import PAUSE_S, Failpoints
from shared.ids import random_hex, uuid7
from shared.relay import SETTLE_LINGER_S, Handed, described, in_time_for
from shared.schemas import TaskState as S
from shared.singleflight import SingleFlight
from shared.states import TRANSITIONS, can_transition, sources_of
from shared.taskrows import previous_events

# ---------------------------------------------------------------- states


def test_every_state_has_a_row() -> None:
    """The transition table covers every state of the contract."""
    assert set(TRANSITIONS) == set(S)


def test_terminal_states_have_no_successors_but_retry() -> None:
    """succeeded is final; failed and cancelled can only go back to queued (POST /retry)."""
    assert TRANSITIONS[S.SUCCEEDED] == frozenset()
    assert TRANSITIONS[S.FAILED] == {S.QUEUED}
    assert TRANSITIONS[S.CANCELLED] == {S.QUEUED}
    for terminal in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        for other in S:
            if other is not S.QUEUED:
                assert not can_transition(terminal, other), (terminal, other)


def test_contract_paths_are_allowed() -> None:
    """queued → running → succeeded, and running → retrying → queued between attempts."""
    for a, b in [
        (S.QUEUED, S.RUNNING),
        (S.RUNNING, S.SUCCEEDED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.CANCELLED),
        (S.RUNNING, S.RETRYING),
        (S.RETRYING, S.QUEUED),
        (S.QUEUED, S.CANCELLED),
    ]:
        assert can_transition(a, b), (a, b)


def test_impossible_transitions_are_refused() -> None:
    """A task cannot skip running to succeed, nor go back to running once succeeded."""
    assert not can_transition(S.QUEUED, S.SUCCEEDED)
    assert not can_transition(S.QUEUED, S.FAILED)
    assert not can_transition(S.SUCCEEDED, S.RUNNING)
    assert not can_transition(S.QUEUED, S.QUEUED)


def test_sources_of_is_the_inverse_of_the_table() -> None:
    """sources_of(new) lists exactly the states whose row names ``new``."""
    assert sources_of(S.SUCCEEDED) == {S.RUNNING}
    assert sources_of(S.RUNNING) == {S.QUEUED, S.RETRYING}
    assert sources_of(S.QUEUED) == {S.RUNNING, S.RETRYING, S.FAILED, S.CANCELLED}
    for new in S:
        assert all(new in TRANSITIONS[s] for s in sources_of(new))


# ---------------------------------------------------------------- backoff


def test_ceiling_doubles_then_caps() -> None:
    """The ceiling is base * factor**(attempt-1), capped."""
    b = Backoff(base_s=1.0, factor=2.0, cap_s=600.0)
    assert [b.ceiling(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert b.ceiling(10) == 512.0
    assert b.ceiling(11) == 600.0
    assert b.ceiling(0) == 1.0  # no negative exponent for a bogus attempt


@pytest.mark.parametrize("attempt", [65, 66, 1_000, 10**6, 10**18])
def test_huge_attempts_do_not_overflow(attempt: int) -> None:
    """A huge attempt number gives the cap, not an OverflowError."""
    b = Backoff(base_s=0.5, factor=3.0, cap_s=60.0)
    assert b.ceiling(attempt) == 60.0
    assert 0.0 <= b.delay(attempt) <= 60.0


def test_ceiling_of_a_large_factor_does_not_overflow_below_the_guard() -> None:
    """factor**64 of a large factor must not overflow either (float range)."""
    b = Backoff(base_s=1.0, factor=1e6, cap_s=10.0)
    assert b.ceiling(60) == 10.0


def test_full_jitter_stays_within_zero_and_ceiling() -> None:
    """Delays are uniform in [0, ceiling]: spread out, never above the ceiling."""
    b = Backoff(base_s=1.0, factor=2.0, cap_s=30.0)
    rng = random.Random(42)
    for attempt in range(1, 12):
        delays = [b.delay(attempt, rng) for _ in range(300)]
        assert all(0.0 <= d <= b.ceiling(attempt) for d in delays)
        # Jitter: not all the same, and reaching into the upper half of the range.
        assert len(set(delays)) > 100
        assert max(delays) > b.ceiling(attempt) / 2


def test_delay_is_deterministic_with_a_seeded_rng() -> None:
    """The same seed gives the same delays (tests can pin them)."""
    b = Backoff()
    assert [b.delay(3, random.Random(7)) for _ in range(2)] == [b.delay(3, random.Random(7))] * 2


# ---------------------------------------------------------------- ids


def test_uuid7_version_and_variant() -> None:
    """uuid7() sets version 7 and the RFC 9562 variant."""
    for _ in range(100):
        value = uuid7()
        assert value.version == 7
        assert value.variant == uuid.RFC_4122


def test_uuid7_embeds_the_current_time() -> None:
    """The first 48 bits are the Unix time in milliseconds."""
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert before <= value.int >> 80 <= after


def test_uuid7_is_time_ordered_across_calls() -> None:
    """Ids made in different milliseconds sort in creation order."""
    ids = []
    for _ in range(5):
        ids.append(uuid7())
        time.sleep(0.002)
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


def test_uuid7_is_unique() -> None:
    """Many ids in the same millisecond do not collide."""
    assert len({uuid7() for _ in range(10_000)}) == 10_000


def test_uuid7_increases_strictly_within_a_millisecond() -> None:
    """The tasks of one batch get ids in creation order, not in random order."""
    ids = [uuid7() for _ in range(10_000)]
    assert len({i.int >> 80 for i in ids}) < len(ids)  # many shared a millisecond
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)


def test_random_hex_spans_draws_without_repeating() -> None:
    """Random ids are hex of the size asked, and none repeats across the buffer's
    refills (a slice taken twice, or the buffer reused, would)."""
    ids = [random_hex() for _ in range(2_000)]  # about eight 4 KiB draws
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(random_hex(5)) == 10


def test_forked_child_draws_its_own_random_bytes() -> None:
    """A child forked with a half-used buffer does not hand out its parent's next bytes,
    nor its parent's next id. (In a fresh interpreter: forking pytest's threads would
    risk the child.)"""
    script = """if True:
        import os, time
        from shared.ids import random_hex, uuid7
        random_hex()  # the buffer now holds bytes the parent has not used
        ms = time.time_ns() // 1_000_000
        while time.time_ns() // 1_000_000 == ms:  # a fresh millisecond: room for ids
            pass
        uuid7()  # the parent's last id, which its next one in the millisecond follows
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            from shared import ids
            # No last id of the parent's to follow (so not its next one), checked as
            # such: the fork rarely falls within the millisecond of that last id.
            fresh = ids._clock.last == (0, 0) and not ids._clock.lock.locked()
            os.write(write_end, f"{random_hex()} {uuid7()} {fresh}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(read_end, 128).decode(), random_hex(), uuid7())
    """
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    child_hex, child_id, fresh, parent_hex, parent_id = done.stdout.split()
    assert fresh == "True"
    assert len(child_hex) == len(parent_hex) == 32
    assert child_hex != parent_hex
    # Made in the same millisecond or not, the two never share an id.
    assert child_id != parent_id


# ---------------------------------------------------------------- keys


def test_generate_parse_verify() -> None:
    """A generated key parses back to its parts and verifies against its stored hash."""
    new = keys.generate("live")
    parsed = keys.parse(new.key)
    assert parsed is not None
    assert (parsed.label, parsed.key_id) == ("live", new.key_id)
    assert new.key.startswith(f"lh_live_{new.key_id}_")
    assert keys.verify(parsed, new.secret_hash)
    assert new.secret_hash != parsed.secret.encode()  # only a hash is stored


def test_wrong_secret_fails() -> None:
    """Another key's hash, or a tampered secret, does not verify."""
    a, b = keys.generate(), keys.generate()
    pa = keys.parse(a.key)
    assert pa is not None
    assert not keys.verify(pa, b.secret_hash)
    tampered = a.key[:-1] + ("A" if a.key[-1] != "A" else "B")
    pt = keys.parse(tampered)
    assert pt is not None and not keys.verify(pt, a.secret_hash)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "lh_",
        "lh_live_abc_def",
        "xx_live_abcdefghijkl_" + "a" * 43,
        "lh_LIVE_abcdefghijkl_" + "a" * 43,
    ],
)
def test_parse_refuses_what_is_not_a_key(key: str) -> None:
    """Strings not of the key shape parse to None."""
    assert keys.parse(key) is None


def test_generate_refuses_bad_labels() -> None:
    """Labels are 1-16 lowercase letters or digits."""
    for label in ("", "Live", "has_underscore", "x" * 17):
        with pytest.raises(ValueError, match="label"):
            keys.generate(label)


def test_redact_hides_the_secret() -> None:
    """redact() keeps label and id, never the secret; garbage redacts to a stub."""
    new = keys.generate("test")
    parsed = keys.parse(new.key)
    assert parsed is not None
    shown = keys.redact(new.key)
    assert parsed.secret not in shown
    assert shown == f"lh_test_{new.key_id}_…"
    assert keys.redact("secret-garbage") == "lh_…"


# ---------------------------------------------------------------- failpoints


def test_failpoints_parse_and_ignore_blanks() -> None:
    """A spec of name=action pairs parses, with spaces and empty items ignored."""
    fp = Failpoints(" relay.after_confirm=crash, ,worker.before_commit=hang,")
    assert fp._points == {"relay.after_confirm": "crash", "worker.before_commit": "hang"}
    assert Failpoints("")._points == {}


@pytest.mark.parametrize("spec", ["a=explode", "a", "a=", "a=Crash"])
def test_failpoints_refuse_bad_actions(spec: str) -> None:
    """An unknown or missing action is a ValueError naming the failpoint."""
    with pytest.raises(ValueError, match="action must be one of"):
        Failpoints(spec)


async def test_unset_failpoint_is_a_no_op() -> None:
    """hit() on a failpoint that is not configured returns at once."""
    await asyncio.wait_for(Failpoints("other=crash").hit("relay.before_publish"), 1.0)


async def test_hang_failpoint_hangs() -> None:
    """A ``hang`` failpoint never returns (until cancelled)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(Failpoints("x=hang").hit("x"), 0.05)


async def test_pause_failpoint_returns_after_its_pause() -> None:
    """A ``pause`` failpoint holds the caller for PAUSE_S, then lets it go on."""
    hit = asyncio.ensure_future(Failpoints("x=pause").hit("x"))
    done, _ = await asyncio.wait({hit}, timeout=PAUSE_S / 5)
    assert not done
    await asyncio.wait_for(hit, PAUSE_S * 10)


def test_breaker_fails_fast_for_the_cooldown_then_probes() -> None:
    """After a failure calls are refused until the cool-down ends; a success closes it."""
    now = [100.0]
    breaker = Breaker(cooldown_s=1.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failed()
    assert not breaker.allow()
    now[0] += 0.99
    assert not breaker.allow()
    now[0] += 0.02
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # the others wait for it: Redis may hang, not fail
    now[0] += 1.01
    assert breaker.allow()  # a probe that never told (cancelled) delays the next only
    breaker.failed()
    breaker.succeeded()
    assert breaker.allow() and breaker.allow()


# ---------------------------------------------------------------- previous events


def _claimed_row(last_seq: int, prev_last_seq: int) -> dict[str, object]:
    now = datetime.now(UTC)
    row: dict[str, object] = {
        "id": uuid7(), "last_seq": last_seq, "state": "running", "progress": 0.0,
        "message": None, "attempts": 1, "updated_at": now, "trace_id": "t1",
    }  # fmt: skip
    prev = {**row, "last_seq": prev_last_seq, "state": "queued", "attempts": 0}
    return {**row, **{f"prev_{k}": v for k, v in prev.items()}}


def test_previous_events_come_only_from_the_version_just_before() -> None:
    """Old values one seq behind rebuild that event; older ones (another writer came in
    between) rebuild nothing."""
    fresh, stale = _claimed_row(2, 1), _claimed_row(5, 3)
    [event] = previous_events([fresh, stale])
    assert (event.task_id, event.seq, event.state, event.attempt) == (fresh["id"], 1, S.QUEUED, 0)
    assert event.trace_id == "t1"


# ---------------------------------------------------------------- single flight


async def test_single_flight_shares_a_call_per_key_and_not_across_keys() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def read(key: str) -> str:
        calls.append(key)
        await release.wait()
        return key.upper()

    flights: SingleFlight[str, str] = SingleFlight("test")
    waiting = [asyncio.create_task(flights.run(k, lambda k=k: read(k))) for k in "aabab"]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == ["A", "A", "B", "A", "B"]
    assert sorted(calls) == ["a", "b"]
    # Once a call ended, the next one for its key runs anew.
    assert await flights.run("a", lambda: read("a")) == "A"
    assert sorted(calls) == ["a", "a", "b"]


def test_handed_rows_are_published_only_while_their_claim_outlasts_a_publish() -> None:
    """A handed-over row is published by its process only if its claim lasts for a
    publish and a deletion (each up to the timeout) and the deletions' linger; else it
    is left to the other relays."""
    now, timeout = 100.0, 5.0
    enough = now + 2 * timeout + SETTLE_LINGER_S

    def row(claimed_until: float) -> Handed:
        return Handed(1, uuid7(), b"{}", claimed_until)

    fresh, edge, late = row(now + 15), row(enough), row(enough - 0.01)
    assert in_time_for([fresh, late, edge], now, timeout) == ([fresh, edge], [late])
    assert in_time_for([], now, timeout) == ([], [])


def test_a_token_opens_only_what_its_kind_was_stored_with() -> None:
    """A single-use token's value is a tenant; a task token's, a tenant and a task; each
    with the key that asked for it, or without (an earlier release's). A value that does
    not fit the token's kind (or is not ids) opens nothing."""
    tenant, task = uuid7(), uuid7()
    assert wstokens.parse_grant(str(tenant), task_token=False) == wstokens.Grant(tenant)
    assert wstokens.parse_grant(f"{tenant} k3y1d", task_token=False) == wstokens.Grant(
        tenant, None, "k3y1d"
    )
    assert wstokens.parse_grant(f"{tenant} k3y1d x", task_token=False) is None
    assert wstokens.parse_grant(f"{tenant} {task}", task_token=True) == wstokens.Grant(tenant, task)
    assert wstokens.parse_grant(f"{tenant} {task} k3y1d", task_token=True) == wstokens.Grant(
        tenant, task, "k3y1d"
    )
    assert wstokens.parse_grant(f"{tenant} {task} Bad-Id", task_token=True) is None
    assert wstokens.parse_grant(f"{tenant} {task} k3y1d x", task_token=True) is None
    assert wstokens.parse_grant(str(tenant), task_token=True) is None
    assert wstokens.parse_grant(f"{tenant} {task}", task_token=False) is None
    assert wstokens.parse_grant("tenant", task_token=False) is None
    assert wstokens.parse_grant(f"{tenant} nope", task_token=True) is None


def test_a_relay_error_names_its_dependency() -> None:
    """ "[Errno 111] Connection refused" alone did not say whose the refusal was."""
    assert described(ConnectionRefusedError(111, "Connection refused")) == (
        "PostgreSQL: ConnectionRefusedError: [Errno 111] Connection refused"
    )
    # Ours name the dependency already: RabbitMQ's refusals, a connect to PostgreSQL.
    rabbit = DependencyError("RabbitMQ did not confirm 2 of 5 messages (0 refused): x")
    assert described(rabbit) == str(rabbit)
    assert len(described(OSError("x" * 1000))) == 300
