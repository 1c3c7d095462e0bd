"""The gateway's pure modules: catch-up plans, live checks, frames, origins, bookkeeping;
and how a session's catch-up names a lost database connection."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast
from uuid import UUID

import asyncpg
import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

from services.ws_gateway import frames, refusals, sse
from services.ws_gateway.catchup import (
    LiveCheck,
    Plan,
    Verdict,
    check_live,
    plan_catch_up,
    row_is_next_event,
)
from services.ws_gateway.hub import Hub, Resync
from services.ws_gateway.metrics import GatewayMetrics
from services.ws_gateway.origins import origin_allowed, parse_allowed_origins
from services.ws_gateway.registry import Refused, Registry
from services.ws_gateway.repository import Head, TaskRepository
from services.ws_gateway.session import Behind, Catcher, DependencyDown, Deps
from services.ws_gateway.settings import LOCAL_ORIGINS
from services.ws_gateway.streams import StreamReader
from services.ws_gateway.sweep import SETTLED_EVERY, Lag, Sweeper
from shared import keys
from shared.schemas import ProgressEvent, TaskState, encode_event
from shared.wire import Wire

T1 = UUID("01920000-0000-7000-8000-000000000001")
T2 = UUID("01920000-0000-7000-8000-000000000002")
A = UUID("01920000-0000-7000-8000-00000000000a")
B = UUID("01920000-0000-7000-8000-00000000000b")


# ---------------------------------------------------------------- catch-up


def test_full_stream_replays_without_snapshot() -> None:
    """A stream holding everything after the client's seq is replayed as is."""
    assert plan_catch_up(2, [3, 4, 5], 5) == Plan(Verdict.STREAM, 2)


def test_stream_may_run_ahead_of_the_row_read_before_it() -> None:
    """Events written between the row read and the stream read are fine."""
    assert plan_catch_up(0, [1, 2, 3], 2) == Plan(Verdict.STREAM, 0)


def test_up_to_date_client_gets_nothing() -> None:
    """A client at the row's seq with nothing newer is told nothing."""
    assert plan_catch_up(5, [], 5).verdict is Verdict.NOTHING


def test_lost_head_needs_snapshot() -> None:
    """A stream starting past after_seq+1 lost events: snapshot, then what follows it."""
    assert plan_catch_up(1, [4, 5, 6], 6) == Plan(Verdict.SNAPSHOT, 6)


def test_empty_stream_behind_row_needs_snapshot_and_is_worth_a_reread() -> None:
    """An empty stream with the row ahead may be a late writer: tail_missing says so."""
    assert plan_catch_up(0, [], 3) == Plan(Verdict.SNAPSHOT, 3, tail_missing=True)


def test_lost_tail_needs_snapshot() -> None:
    """The stream ending before the row's seq means the tail is missing."""
    assert plan_catch_up(1, [2, 3], 5) == Plan(Verdict.SNAPSHOT, 5, tail_missing=True)


def test_client_ahead_of_the_database_gets_a_snapshot() -> None:
    """A bogus after_seq beyond the row resets the client to the truth."""
    assert plan_catch_up(9, [], 4) == Plan(Verdict.SNAPSHOT, 4)


@pytest.mark.parametrize(
    ("delivered", "seq", "expected"),
    [
        (0, 1, LiveCheck.SEND),
        (4, 5, LiveCheck.SEND),
        (5, 5, LiveCheck.DUPLICATE),
        (5, 3, LiveCheck.DUPLICATE),
        (5, 7, LiveCheck.GAP),
    ],
)
def test_live_check(delivered: int, seq: int, expected: LiveCheck) -> None:
    """Live events are sent in order, duplicates dropped, holes detected."""
    assert check_live(delivered, seq) is expected


# ---------------------------------------------------------------- frames


def test_parse_subscribe_and_unsubscribe() -> None:
    """Well-formed ops parse to their dataclasses; after_seq defaults to 0."""
    assert frames.parse_client_frame(
        json.dumps({"op": "subscribe", "task_id": str(T1)})
    ) == frames.Subscribe(T1, 0)
    assert frames.parse_client_frame(
        json.dumps({"op": "subscribe", "task_id": str(T1), "after_seq": 7})
    ) == frames.Subscribe(T1, 7)
    assert frames.parse_client_frame(
        json.dumps({"op": "unsubscribe", "task_id": str(T1)})
    ) == frames.Unsubscribe(T1)


@pytest.mark.parametrize(
    "raw",
    [
        "nope",
        "[]",
        '{"op": "dance", "task_id": "x"}',
        '{"op": "subscribe"}',
        '{"op": "subscribe", "task_id": "not-a-uuid"}',
        f'{{"op": "subscribe", "task_id": "{T1}", "after_seq": -1}}',
        f'{{"op": "subscribe", "task_id": "{T1}", "after_seq": true}}',
        f'{{"op": "subscribe", "task_id": "{T1}", "after_seq": 1.5}}',
    ],
)
def test_bad_frames_are_bad_requests(raw: str) -> None:
    """Anything else is a BadRequest, answered with an error frame, never a crash."""
    assert isinstance(frames.parse_client_frame(raw), frames.BadRequest)


def test_a_subscribe_to_no_uuid_is_not_found_and_other_bad_frames_bad_requests() -> None:
    """No task can have an id that is no UUID: its subscribe gets the unknown id's
    not_found; a malformed unsubscribe or op stays a bad_request."""
    op = frames.parse_client_frame('{"op": "subscribe", "task_id": "not-a-uuid"}')
    assert op == frames.BadRequest("no such task", "not-a-uuid", code="not_found")
    op = frames.parse_client_frame('{"op": "unsubscribe", "task_id": "not-a-uuid"}')
    assert isinstance(op, frames.BadRequest) and op.code == "bad_request"
    op = frames.parse_client_frame('{"op": "subscribe"}')
    assert isinstance(op, frames.BadRequest) and op.code == "bad_request"


def test_event_frame_has_the_contract_fields() -> None:
    """The event frame carries the contract's fields, snapshot only when true."""
    event = ProgressEvent(
        task_id=T1,
        seq=3,
        state=TaskState.RUNNING,
        progress=0.3,
        message="step 3",
        ts=datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
    )
    out = json.loads(frames.event_frame(event))
    assert out == {
        "type": "event",
        "task_id": str(T1),
        "seq": 3,
        "state": "running",
        "progress": 0.3,
        "message": "step 3",
        "data": None,
        "ts": "2026-01-02T03:04:05.006Z",
        "attempt": 0,
    }
    snap = json.loads(frames.event_frame(event.model_copy(update={"snapshot": True})))
    assert snap["snapshot"] is True
    assert sse.message(event, frames.event_frame(event)).startswith("id: 3\ndata: {")


# ---------------------------------------------------------------- origins


def test_default_origins_allow_local_pages_only() -> None:
    """Local pages on any port pass; other hosts and look-alikes do not."""
    allowed = parse_allowed_origins(f"http://127.0.0.1:8000,{LOCAL_ORIGINS}")  # the default
    for ok in (
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://localhost:5173",
        "HTTP://LOCALHOST:3000",
        "http://[::1]:8000",
    ):
        assert origin_allowed(ok, allowed, allow_missing=False), ok
    for bad in (
        "https://evil.example",
        "http://localhost.evil.example:8000",
        "http://localhost:80@evil.example",
        "http://127.0.0.1.nip.io:8000",
        "null",
        "http://localhost",
    ):
        assert not origin_allowed(bad, allowed, allow_missing=False), bad


def test_missing_origin_follows_the_setting() -> None:
    """No Origin (a non-browser client) passes only when allowed."""
    allowed = parse_allowed_origins("https://app.example.com")
    assert origin_allowed(None, allowed, allow_missing=True)
    assert not origin_allowed(None, allowed, allow_missing=False)


def test_allowed_patterns_match_any_case_as_websockets_applies_them() -> None:
    """websockets checks the raw Origin header against the same patterns: they must
    agree with ours on case (scheme and host have none)."""
    allowed = parse_allowed_origins("https://App.Example.com,http://localhost:*")
    for origin in ("https://app.example.com", "HTTPS://APP.EXAMPLE.COM", "http://LocalHost:3000"):
        assert any(p.fullmatch(origin) for p in allowed), origin
        assert origin_allowed(origin, allowed, allow_missing=False), origin


def test_wildcard_is_one_label() -> None:
    """'*' stands for one host label, not for dots or another domain."""
    allowed = parse_allowed_origins("https://*.example.com")
    assert origin_allowed("https://app.example.com", allowed, allow_missing=False)
    assert not origin_allowed("https://a.b.example.com", allowed, allow_missing=False)
    assert not origin_allowed("https://example.com.evil.io", allowed, allow_missing=False)


def test_malformed_origin_entry_is_refused() -> None:
    """A typo in the allow-list stops the service instead of allowing nothing or all."""
    with pytest.raises(ValueError, match="not an origin"):
        parse_allowed_origins("localhost:8000")
    assert parse_allowed_origins(" , ,") == ()  # no browser at all (see test_settings)


# ---------------------------------------------------------------- refusals

HANDSHAKE = {
    "Host": "x",
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def handshake(method: str = "GET", protocol: str = "HTTP/1.1", **changes: str | None) -> Request:
    fields = {**HANDSHAKE, **{name.replace("_", "-"): v for name, v in changes.items()}}
    headers = Headers([(name, value) for name, value in fields.items() if value is not None])
    return Request("/v1/ws?token=t", headers, method, protocol)


def test_a_handshake_websockets_would_take_is_not_refused() -> None:
    protocol = ServerProtocol(origins=[re.compile("http://localhost:5173"), None])
    assert refusals.not_a_handshake(protocol, handshake()) is None
    assert refusals.not_a_handshake(protocol, handshake(Origin="http://localhost:5173")) is None


@pytest.mark.parametrize(
    ("request_", "status", "headers"),
    [
        (handshake(Connection=None, Upgrade=None), 426, {"Upgrade": "websocket"}),
        (handshake(Upgrade="h2c"), 426, {"Upgrade": "websocket"}),
        (handshake(method="POST"), 405, {"Allow": "GET"}),
        (handshake(protocol="HTTP/1.0"), 505, {}),
        (handshake(Sec_WebSocket_Key=None), 400, {}),
        (handshake(Sec_WebSocket_Key="c2hvcnQ="), 400, {}),
        (handshake(Sec_WebSocket_Version="8"), 400, {"Sec-WebSocket-Version": "13"}),
        (handshake(Origin="https://evil.example"), 403, {}),
    ],
)
def test_what_websockets_would_refuse_is_a_problem_before_the_token(
    request_: Request, status: int, headers: dict[str, str]
) -> None:
    """The status websockets' accept() answers, as problem JSON, with the headers the
    status calls for."""
    protocol = ServerProtocol(origins=[re.compile("http://localhost:5173")])
    response = refusals.not_a_handshake(protocol, request_)
    assert response is not None and response.status_code == status
    assert response.headers["Content-Type"] == "application/problem+json"
    assert json.loads(response.body)["status"] == status
    for name, value in headers.items():
        assert response.headers[name] == value
    assert protocol.accept(request_).status_code == status  # websockets' own answer


def test_a_method_refusal_names_the_allowed_ones() -> None:
    assert refusals.wrong_method("GET", refusals.GET) is None
    assert refusals.wrong_method("HEAD", refusals.GET_HEAD) is None
    response = refusals.wrong_method("DELETE", refusals.GET_HEAD)
    assert response is not None and response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"


def test_an_api_key_has_a_shape_no_token_has() -> None:
    """Told apart with no look-up, even from a token that starts as a key does."""
    assert refusals.is_api_key(keys.generate("dev").key)
    for token in ("", "forged", "lh_" + "x" * 40, "t." + secrets.token_urlsafe(32)):
        assert not refusals.is_api_key(token), token


# ---------------------------------------------------------------- registry


def test_registry_fans_out_to_subscribers_only() -> None:
    """Listeners of a task are exactly the connections subscribed to it."""
    reg: Registry[str] = Registry(max_connections=10, max_per_tenant=10, max_subscriptions=10)
    reg.open("c1", A)
    reg.open("c2", A)
    assert reg.subscribe("c1", T1) is True
    assert reg.subscribe("c1", T1) is False
    reg.subscribe("c2", T1)
    reg.subscribe("c2", T2)
    assert sorted(reg.listeners(T1)) == ["c1", "c2"]
    reg.unsubscribe("c2", T1)
    assert reg.listeners(T1) == ("c1",)
    reg.close("c1")
    reg.close("c1")  # idempotent
    assert reg.listeners(T1) == ()
    assert reg.subscription_count == 1 and reg.connection_count == 1


def test_registry_caps() -> None:
    """Connection caps per process and per tenant, and the subscription cap, refuse."""
    reg: Registry[str] = Registry(max_connections=3, max_per_tenant=2, max_subscriptions=1)
    reg.open("a1", A)
    reg.open("a2", A)
    with pytest.raises(Refused):
        reg.open("a3", A)
    reg.open("b1", B)
    with pytest.raises(Refused):
        reg.check_room()
    reg.close("a1")
    reg.check_room(A)
    reg.subscribe("b1", T1)
    with pytest.raises(Refused) as info:
        reg.subscribe("b1", T2)
    assert info.value.code == "too_many_subscriptions"


def test_a_room_check_for_a_tenant_leaves_nothing_behind() -> None:
    """A handshake checked and then failed (a plain GET with a token) keeps no entry."""
    reg: Registry[str] = Registry(max_connections=3, max_per_tenant=2, max_subscriptions=1)
    for _ in range(3):
        reg.check_room(A)
    assert not reg._per_tenant


def test_frame_cache_serves_an_equal_event_and_tells_snapshots_apart() -> None:
    """A frame is encoded once per (task, seq, snapshot), whichever object asks for it
    (a subscriber that fell behind asks with the same event long after the dispatch,
    a replay with a copy parsed from the stream); the oldest frame goes first."""
    cache = frames.FrameCache(size=2)
    task = UUID("0190a000-0000-7000-8000-000000000001")
    at = datetime(2026, 12, 1, tzinfo=UTC)

    def event(seq: int, **kw: object) -> ProgressEvent:
        return ProgressEvent(
            task_id=task, seq=seq, state=TaskState.RUNNING, progress=0.5, ts=at, **kw
        )

    first = cache.frame(event(3, data={"k": 1}))
    assert cache.frame(event(3, data={"k": 1})) is first
    snapshot = cache.frame(event(3, snapshot=True))
    assert json.loads(snapshot)["snapshot"] is True and "snapshot" not in json.loads(first)
    cache.frame(event(4))  # size 2: the frame of seq 3 goes
    assert cache.frame(event(3, data={"k": 1})) is not first
    assert json.loads(cache.frame(event(3, data={"k": 1}))) == json.loads(first)


def test_frame_cache_holds_a_bounded_number_of_bytes() -> None:
    """Frames of large progress data leave the cache by size, not only by count."""
    cache = frames.FrameCache(size=1000, max_bytes=50_000)
    task = UUID("0190a000-0000-7000-8000-000000000001")
    at = datetime(2026, 12, 1, tzinfo=UTC)
    for seq in range(1, 101):
        cache.frame(
            ProgressEvent(
                task_id=task, seq=seq, state=TaskState.RUNNING, progress=0.5, ts=at,
                data="x" * 10_000,
            )
        )  # fmt: skip
    assert cache._bytes <= 50_000 and len(cache._frames) == 4
    assert cache._bytes == sum(len(f) for f in cache._frames.values())


@pytest.mark.parametrize(
    ("delivered", "last_seq", "state", "expected"),
    [
        (0, 1, "queued", True),  # just submitted: the row is the queued event
        (2, 3, "succeeded", True),  # one behind a finished task
        (3, 4, "retrying", True),
        (0, 2, "queued", False),  # two behind: the stream has the first
        (1, 1, "queued", False),  # up to date
        (2, 3, "running", False),  # a progress report may carry data the row lacks
    ],
)
def test_the_row_stands_for_the_one_event_missing_unless_it_may_carry_data(
    delivered: int, last_seq: int, state: str, expected: bool
) -> None:
    assert row_is_next_event(delivered, last_seq, state) is expected


# ---------------------------------------------------------------- the hub's dispatch


class _Listener:
    def __init__(self) -> None:
        self.items: list[object] = []

    def offer(self, item: object) -> None:
        self.items.append(item)


def _hub(registry: Registry[_Listener]) -> Hub:
    metrics = GatewayMetrics(lambda: 0.0, lambda: 0.0)
    return Hub("redis://unused", Wire("ns"), registry, metrics, io_timeout=1.0)


def test_the_hub_hands_an_event_to_its_tasks_listeners_only() -> None:
    reg: Registry[_Listener] = Registry(max_connections=10, max_per_tenant=10, max_subscriptions=10)
    watching, other = _Listener(), _Listener()
    for listener, task in ((watching, T1), (other, T2)):
        reg.open(listener, A)
        reg.subscribe(listener, task)
    hub, wire = _hub(reg), Wire("ns")
    event = ProgressEvent(
        task_id=T1,
        seq=2,
        state=TaskState.RUNNING,
        progress=0.0,
        ts=datetime(2026, 1, 2, tzinfo=UTC),
    )
    hub._dispatch(wire.event_channel(T1).encode(), encode_event(event))
    # On another task's channel, or not a task's channel at all: nobody gets it.
    hub._dispatch(wire.event_channel(T2).encode(), encode_event(event))
    hub._dispatch(wire.event_channel("not-a-task").encode(), encode_event(event))
    assert (watching.items, other.items) == ([event], [])


def test_the_hub_does_not_parse_an_event_nobody_here_watches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every gateway sees every event: the ones no client of its watches cost a lookup."""
    reg: Registry[_Listener] = Registry(max_connections=10, max_per_tenant=10, max_subscriptions=10)
    listener = _Listener()
    reg.open(listener, A)
    reg.subscribe(listener, T1)
    hub, wire = _hub(reg), Wire("ns")
    hub._dispatch(wire.event_channel(T2).encode(), b"not json")
    assert "malformed live event" not in caplog.text
    hub._dispatch(wire.event_channel(T1).encode(), b"not json")
    assert "malformed live event" in caplog.text
    assert listener.items == []


# ---------------------------------------------------------------- sweep


def test_lag_names_a_seq_only_after_a_whole_check_period() -> None:
    """A seq seen at one check is due at the next: the live event had a whole period to
    arrive. Tasks no longer read are forgotten, and seq 0 (no event yet) is never due."""
    lag = Lag()
    assert lag.observe({T1: 3, T2: 0}) == {}
    assert lag.observe({T1: 5, T2: 1}) == {T1: 3}
    assert lag.observe({T2: 1}) == {T2: 1}
    assert lag.observe({T1: 9}) == {}


class _Watcher:
    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.offered: list[Behind] = []

    __hash__ = object.__hash__

    def behind(self, task_id: UUID, seq: int) -> bool:
        return self.cursor < seq

    def offer(self, item: Behind) -> None:
        self.offered.append(item)


class _Rows:
    def __init__(self) -> None:
        self.seqs: dict[UUID, int] = {}
        self.ended: set[UUID] = set()
        self.asked: list[list[UUID]] = []

    async def heads(self, task_ids: Sequence[UUID]) -> dict[UUID, Head]:
        self.asked.append(sorted(task_ids))
        return {t: Head(self.seqs[t], t in self.ended) for t in task_ids if t in self.seqs}


async def test_the_sweep_sends_only_a_subscriber_left_behind_to_catch_up() -> None:
    """Of two subscribers of a task, the one still below the seq the row had one check
    ago is sent to catch up, with all its lagging tasks in one item; the one that got it
    is not; nothing is read while nobody watches."""
    registry: Registry[_Watcher] = Registry(
        max_connections=10, max_per_tenant=10, max_subscriptions=10
    )
    rows = _Rows()
    metrics = GatewayMetrics(connections=lambda: 0.0, subscriptions=lambda: 0.0)
    sweeper = Sweeper(registry, rows, metrics, check_s=1)
    assert await sweeper.check() == 0 and rows.asked == []
    stuck, fine = _Watcher(cursor=2), _Watcher(cursor=3)
    for watcher in (stuck, fine):
        registry.open(watcher, A)
        registry.subscribe(watcher, T1)
    registry.subscribe(stuck, T2)
    rows.seqs = {T1: 3, T2: 7}
    assert await sweeper.check() == 0  # the events may still be on their way
    rows.seqs = {T1: 4, T2: 7}
    assert await sweeper.check() == 2
    assert stuck.offered == [Behind(((T1, 3), (T2, 7)))] and fine.offered == []
    assert rows.asked == [[T1, T2], [T1, T2]]
    assert b"longhaul_gateway_sweep_rechecks_total 2.0" in metrics.render()


async def test_a_task_every_subscriber_saw_end_is_read_again_only_now_and_then() -> None:
    """A finished task whose subscribers all hold its terminal event is left out of the
    reads until every SETTLED_EVERY-th check; a subscriber still short of it keeps the
    task read. When a retry's events missed Redis, the subscriber still catches up,
    after that check."""
    registry: Registry[_Watcher] = Registry(
        max_connections=10, max_per_tenant=10, max_subscriptions=10
    )
    rows = _Rows()
    metrics = GatewayMetrics(connections=lambda: 0.0, subscriptions=lambda: 0.0)
    sweeper = Sweeper(registry, rows, metrics, check_s=1)
    done, short = _Watcher(cursor=4), _Watcher(cursor=3)
    registry.open(done, A)
    registry.open(short, A)
    registry.subscribe(done, T1)
    registry.subscribe(short, T2)
    rows.seqs, rows.ended = {T1: 4, T2: 4}, {T1, T2}
    assert await sweeper.check() == 0
    assert await sweeper.check() == 1  # T2's subscriber is sent to catch up
    assert short.offered == [Behind(((T2, 4),))]
    assert rows.asked == [[T1, T2], [T2]]
    short.cursor = 4
    assert await sweeper.check() == 0
    # T1 is retried; its queued event (seq 5) never reached anyone.
    rows.seqs[T1], rows.ended = 5, {T2}
    checks = 3
    while checks % SETTLED_EVERY:
        assert await sweeper.check() == 0
        checks += 1
    assert rows.asked[2:] == [[T2], [T1, T2]]  # nothing read between; T2 settled again
    assert await sweeper.check() == 1
    assert done.offered == [Behind(((T1, 5),))] and rows.asked[-1] == [T1]


async def test_a_settled_task_is_read_again_once_a_subscriber_moves_off_its_end() -> None:
    """A new subscriber still catching up, or one sent a newer event (a retry's, live),
    puts a settled task back into the reads at the next check."""
    registry: Registry[_Watcher] = Registry(
        max_connections=10, max_per_tenant=10, max_subscriptions=10
    )
    rows = _Rows()
    metrics = GatewayMetrics(connections=lambda: 0.0, subscriptions=lambda: 0.0)
    sweeper = Sweeper(registry, rows, metrics, check_s=1)
    first = _Watcher(cursor=4)
    registry.open(first, A)
    registry.subscribe(first, T1)
    rows.seqs, rows.ended = {T1: 4}, {T1}
    await sweeper.check()
    await sweeper.check()
    assert rows.asked == [[T1]]  # settled at the first check
    newcomer = _Watcher(cursor=0)
    registry.open(newcomer, A)
    registry.subscribe(newcomer, T1)
    await sweeper.check()
    assert rows.asked == [[T1], [T1]]
    newcomer.cursor = 4
    await sweeper.check()
    await sweeper.check()
    assert rows.asked == [[T1], [T1], [T1]]  # settled again
    first.cursor = 5
    await sweeper.check()
    assert rows.asked == [[T1], [T1], [T1], [T1]]


class _DownRepository:
    """A task repository whose connection was closed under it, as asyncpg reports it
    (InterfaceError, which is not a PostgresError)."""

    async def task_row(self, task_id: UUID, tenant_id: UUID) -> None:
        raise asyncpg.InterfaceError("connection is closed")


async def test_a_closed_database_connection_is_a_dependency_down_not_a_crash() -> None:
    """The session closes with 1013 (try again later) on DependencyDown, 1011 on
    anything else: a lost connection must be the first."""
    deps = Deps(
        registry=Registry(max_connections=1, max_per_tenant=1, max_subscriptions=1),
        repository=cast(TaskRepository, _DownRepository()),
        streams=cast(StreamReader, None),
        metrics=GatewayMetrics(connections=lambda: 0.0, subscriptions=lambda: 0.0),
        queue_size=1,
        snapshot_grace_s=0,
        close_timeout_s=1,
        frame_cache=frames.FrameCache(),
    )
    with pytest.raises(DependencyDown):
        await Catcher(deps, A).row(T1)


def _stream(after_seq: int, queue_size: int = 16) -> sse.Stream:
    deps = Deps(  # offer() and behind() touch no I/O
        registry=Registry(max_connections=1, max_per_tenant=1, max_subscriptions=1),
        repository=cast(TaskRepository, None),
        streams=cast(StreamReader, None),
        metrics=GatewayMetrics(connections=lambda: 0.0, subscriptions=lambda: 0.0),
        queue_size=queue_size,
        snapshot_grace_s=0,
        close_timeout_s=1,
        frame_cache=frames.FrameCache(),
    )
    return sse.Stream(deps, A, T1, after_seq, heartbeat_s=15)


def test_live_events_piling_up_at_an_sse_stream_give_way_to_a_read() -> None:
    """A stream waiting for its client keeps at most the queue size of live events;
    past that it drops them and reads instead (the row and the stream hold them)."""
    stream = _stream(after_seq=0, queue_size=2)
    for seq in (1, 2, 3):
        stream.offer(
            ProgressEvent(
                task_id=T1, seq=seq, state=TaskState.RUNNING, progress=0.1, ts=datetime.now(UTC)
            )
        )
    assert stream._live == [] and stream._read_needed


def test_an_sse_stream_wakes_for_news_only() -> None:
    def event(seq: int, state: TaskState) -> ProgressEvent:
        return ProgressEvent(
            task_id=T1, seq=seq, state=state, progress=1.0, ts=datetime(2026, 1, 2, tzinfo=UTC)
        )

    stream = _stream(after_seq=3)
    stream.offer(event(3, TaskState.SUCCEEDED))  # published again by a redelivery
    assert not stream.woken.is_set()
    stream.offer(event(4, TaskState.QUEUED))  # a retry
    assert stream.woken.is_set()
    for news in (Resync(), Behind(((T1, 4),))):
        stream = _stream(after_seq=3)
        stream.offer(news)
        assert stream.woken.is_set()
    stream = _stream(after_seq=3)
    stream.stop()
    assert stream.woken.is_set()


def test_live_events_that_follow_on_from_the_cursor_go_out_as_they_are() -> None:
    def ev(seq: int) -> ProgressEvent:
        return ProgressEvent(
            task_id=T1, seq=seq, state=TaskState.RUNNING, progress=0.5, ts=datetime.now(UTC)
        )

    def seqs(run: list[ProgressEvent] | None) -> list[int] | None:
        return None if run is None else [e.seq for e in run]

    assert seqs(sse.live_run([ev(4), ev(5)], 3)) == [4, 5]
    assert seqs(sse.live_run([ev(5), ev(4), ev(4), ev(2)], 3)) == [4, 5]  # order, dupes, old
    assert sse.live_run([ev(5)], 3) is None  # a hole: the reads fill it
    assert sse.live_run([ev(4), ev(6)], 3) is None
    assert sse.live_run([], 3) is None  # woken with nothing live: read


def test_an_sse_stream_is_behind_the_row_of_its_own_task_only() -> None:
    stream = _stream(after_seq=3)
    assert stream.behind(T1, 4)
    assert not stream.behind(T1, 3)
    assert not stream.behind(T2, 9)


def test_an_sse_response_is_chunked_and_says_so() -> None:
    head = sse.head({"Access-Control-Allow-Origin": "http://localhost:5173"})
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert "Transfer-Encoding: chunked" in lines
    assert "Content-Type: text/event-stream; charset=utf-8" in lines
    assert "Access-Control-Allow-Origin: http://localhost:5173" in lines
    assert not any(line.lower().startswith("content-length") for line in lines)
    assert sse.chunk(b"id: 1\n\n") == b"7\r\nid: 1\n\n\r\n"
    assert sse.chunk(b"x" * 300).startswith(b"12c\r\n")
    assert sse.LAST_CHUNK == b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("header", "query", "expected"),
    [
        (None, None, 0),
        ("", None, 0),
        ("7", "9", 7),  # the header wins over the query
        (None, "0012", 12),
        (None, str(2**63 - 1), 2**63 - 1),
    ],
)
def test_last_event_id_is_a_decimal_seq(
    header: str | None, query: str | None, expected: int
) -> None:
    assert sse.parse_last_event_id(header, query) == expected


@pytest.mark.parametrize(
    "raw", ["1_0", " 5", "+5", "-1", "\u0663", "\uff15", "0x10", str(2**63), "9" * 4000]
)
def test_last_event_id_refuses_what_is_not_ascii_digits_or_past_a_bigint(raw: str) -> None:
    """int() took all but "-1" and 0x10 (a seq past a bigint then failed in PostgreSQL)."""
    assert sse.parse_last_event_id(raw, None) is None
    assert sse.parse_last_event_id(None, raw) is None
