"""The task list's time window, its pure parts: reading ``created_after`` and
``created_before`` (RFC 3339, strictly) into the 422s the other list parameters give,
the id range a window reads, and the statement and OpenAPI document that go with it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import example, given
from hypothesis import strategies as st

from services.api import requests as rq
from services.api.openapi import build_openapi
from services.api.problems import ProblemException
from services.api.repository import TASK_COLUMNS, id_range, list_statement
from services.api.timestamps import BadTimestamp, parse_rfc3339
from shared.ids import uuid7
from shared.schemas import TaskState

MIGRATION = Path(__file__).resolve().parents[2] / "shared/migrations/0014_tasks_id_time_apart.sql"


def _query(query: str, *, filters: bool = True) -> rq.ListQuery:
    return rq.list_query(make_mocked_request("GET", f"/v1/tasks?{query}"), filters=filters)


def _errors(query: str, *, filters: bool = True) -> list[tuple[list[str | int], str]]:
    with pytest.raises(ProblemException) as info:
        _query(query, filters=filters)
    problem = info.value.problem
    assert problem.status == 422 and problem.type.endswith("/validation")
    return [(e.loc, e.msg) for e in problem.errors or []]


def _utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


# ---------------------------------------------------------------- reading timestamps


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-12-07T10:00:00Z", _utc(2026, 12, 7, 10)),
        ("2026-12-07t10:00:00z", _utc(2026, 12, 7, 10)),  # RFC 3339's ABNF ignores case
        ("2026-12-07T10:00:00.5+01:00", _utc(2026, 12, 7, 9, 0, 0, 500_000)),
        ("2026-12-07T10:00:00-00:00", _utc(2026, 12, 7, 10)),
        ("2026-12-07T04:30:00-05:30", _utc(2026, 12, 7, 10)),
        ("2026-12-07T10:00:00.123456Z", _utc(2026, 12, 7, 10, 0, 0, 123_456)),
        # Finer than a microsecond rounds up: stored values are whole microseconds.
        ("2026-12-07T10:00:00.1234560Z", _utc(2026, 12, 7, 10, 0, 0, 123_456)),
        ("2026-12-07T10:00:00.1234561Z", _utc(2026, 12, 7, 10, 0, 0, 123_457)),
        ("2026-12-07T10:00:59.9999999Z", _utc(2026, 12, 7, 10, 1)),
        # A leap second is the next second's start, as PostgreSQL reads it.
        ("2016-12-31T23:59:60Z", _utc(2017, 1, 1)),
        ("0001-01-01T00:00:00Z", _utc(1, 1, 1)),
        ("9999-12-31T23:59:59.999999Z", _utc(9999, 12, 31, 23, 59, 59, 999_999)),
    ],
)
def test_an_rfc3339_timestamp_is_read_as_its_instant_in_utc(raw: str, expected: datetime) -> None:
    parsed = parse_rfc3339(raw)
    assert parsed == expected and parsed.tzinfo is UTC


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("2026-12-07T10:00:00", "has no timezone"),
        ("2026-12-07T10:00:00.25", "has no timezone"),
        ("2026-12-07T10:00:00 01:00", "send it as %2B"),  # "+01:00" unencoded in a URL
        ("2026-12-07", "not an RFC 3339 timestamp"),
        ("2026-12-07 10:00:00Z", "not an RFC 3339 timestamp"),
        ("20261207T100000Z", "not an RFC 3339 timestamp"),
        ("2026-12-07T10:00Z", "not an RFC 3339 timestamp"),
        ("2026-12-07T10:00:00.Z", "not an RFC 3339 timestamp"),
        ("2026-12-07T10:00:00+0100", "not an RFC 3339 timestamp"),
        ("2026-12-07T10:00:00Z ", "not an RFC 3339 timestamp"),
        ("٢٠٢٦-12-07T10:00:00Z", "not an RFC 3339 timestamp"),  # Arabic-Indic digits
        ("1733565600", "not an RFC 3339 timestamp"),
        ("", "not an RFC 3339 timestamp"),
        ("2026-02-29T10:00:00Z", "not a date and time that exists"),
        ("2026-12-07T24:00:00Z", "not a date and time that exists"),
        ("2026-12-07T10:00:61Z", "not a date and time that exists"),
        ("2026-12-07T10:00:00+24:00", "not a date and time that exists"),
        ("2026-12-07T10:00:00+01:60", "not a date and time that exists"),
        ("0000-12-07T10:00:00Z", "not a date and time that exists"),
        ("0001-01-01T00:00:00+00:01", "out of range"),
        ("9999-12-31T23:59:59-00:01", "out of range"),
        ("9999-12-31T23:59:59.9999999Z", "out of range"),
    ],
)
def test_what_is_not_an_rfc3339_instant_is_refused_saying_why(raw: str, says: str) -> None:
    with pytest.raises(BadTimestamp) as info:
        parse_rfc3339(raw)
    assert says in str(info.value)


# ---------------------------------------------------------------- the query parameters


def test_the_window_is_read_with_the_other_filters() -> None:
    q = _query(
        "state=failed&type=a.b&limit=7&created_after=2026-12-07T10:00:00%2B01:00"
        "&created_before=2026-12-07T10:00:00Z"
    )
    assert (q.state, q.type, q.limit, q.before) == (TaskState.FAILED, "a.b", 7, None)
    assert (q.created_after, q.created_before) == (_utc(2026, 12, 7, 9), _utc(2026, 12, 7, 10))


def test_either_end_of_the_window_may_be_left_open() -> None:
    after = _query("created_after=2026-12-07T10:00:00Z")
    assert (after.created_after, after.created_before) == (_utc(2026, 12, 7, 10), None)
    before = _query("created_before=2026-12-07T10:00:00Z")
    assert (before.created_after, before.created_before) == (None, _utc(2026, 12, 7, 10))
    assert (_query("").created_after, _query("").created_before) == (None, None)


def test_a_cursor_is_read_with_the_window() -> None:
    last = uuid7()
    q = _query(f"created_after=2026-12-07T10:00:00Z&cursor={rq.encode_cursor(last)}")
    assert (q.created_after, q.before) == (_utc(2026, 12, 7, 10), last)


def test_a_bad_timestamp_is_a_422_at_its_parameter() -> None:
    with pytest.raises(ProblemException) as info:
        _query("created_after=yesterday&created_before=2026-12-07T10:00:00")
    problem = info.value.problem
    assert problem.status == 422 and problem.type.endswith("/validation")
    assert [(e.loc, e.msg) for e in problem.errors or []] == [
        (["query", "created_after"], "not an RFC 3339 timestamp such as 2026-12-07T10:00:00Z"),
        (
            ["query", "created_before"],
            "has no timezone: end it with Z or an offset (2026-12-07T10:00:00Z)",
        ),
    ]
    assert problem.detail is not None and problem.detail.startswith(
        "query.created_after: not an RFC 3339 timestamp"
    )


@pytest.mark.parametrize(
    "window",
    [
        "created_after=2026-12-07T10:00:00Z&created_before=2026-12-07T10:00:00Z",
        "created_after=2026-12-07T10:00:00Z&created_before=2026-12-07T09:59:59.999999Z",
        # The same instant written in two offsets is still an empty window.
        "created_after=2026-12-07T10:00:00Z&created_before=2026-12-07T11:00:00%2B01:00",
    ],
)
def test_a_window_that_ends_where_or_before_it_starts_is_a_422(window: str) -> None:
    assert _errors(window) == [(["query", "created_before"], "must be later than created_after")]


def test_a_window_of_one_microsecond_is_read() -> None:
    q = _query("created_after=2026-12-07T10:00:00Z&created_before=2026-12-07T10:00:00.000001Z")
    assert q.created_before is not None and q.created_after is not None
    assert q.created_before - q.created_after == timedelta(microseconds=1)


def test_an_unencoded_plus_in_the_query_string_is_told_apart() -> None:
    """A URL's query reads "+" as a space: the 422 says to encode it."""
    assert _errors("created_after=2026-12-07T10:00:00+01:00") == [
        (["query", "created_after"], "a '+' in a query string reads as a space: send it as %2B")
    ]


@pytest.mark.parametrize("name", ["created_after", "created_before"])
def test_a_repeated_window_parameter_is_a_422_not_its_first_value(name: str) -> None:
    query = f"{name}=2026-12-07T10:00:00Z&{name}=2026-12-08T10:00:00Z"
    assert _errors(query) == [(["query", name], "given more than once; it takes one value")]


def test_the_dead_letter_list_takes_no_window() -> None:
    """The window is the task list's: the dead letters' list refuses it by name."""
    assert _errors("created_after=2026-12-07T10:00:00Z", filters=False) == [
        (["query", "created_after"], "unknown parameter")
    ]


def test_the_openapi_document_lists_the_parameters_the_lists_read() -> None:
    paths = build_openapi("http://x")["paths"]

    def names(path: str) -> set[str]:
        return {p["name"] for p in paths[path]["get"]["parameters"] if p["in"] == "query"}

    assert names("/v1/tasks") == {*rq.PAGE_PARAMETERS, *rq.TASK_FILTERS}
    assert names("/v1/dead-letters") == set(rq.PAGE_PARAMETERS)
    window = [p for p in paths["/v1/tasks"]["get"]["parameters"] if p["name"].startswith("created")]
    assert all(p["schema"] == {"type": "string", "format": "date-time"} for p in window)


# ---------------------------------------------------------------- the id range of a window


def _id(ms: int, rand: int = 0) -> UUID:
    """A UUIDv7 of Unix time ``ms`` (as shared.ids makes them)."""
    return UUID(int=ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0x2 << 62 | rand & ((1 << 62) - 1))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INSTANTS = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


@given(
    created_at=_INSTANTS,
    # Outside the index of tasks apart: id time within a minute of created_at, as
    # PostgreSQL computes it (to a microsecond).
    apart=st.integers(min_value=-60_000_001, max_value=60_000_001),
    rand=st.integers(min_value=0, max_value=(1 << 74) - 1),
    before_start=st.integers(min_value=0, max_value=10**12),
    after_end=st.integers(min_value=1, max_value=10**12),
    open_start=st.booleans(),
    open_end=st.booleans(),
)
# At the edges: created at the window's start with its id time a minute before, and
# just before its end with its id time a minute after.
@example(_utc(2026, 12, 7, 10), -60_000_001, 0, 0, 1, False, False)
@example(_utc(2026, 12, 7, 10, 59, 59, 999_999), 60_000_001, (1 << 74) - 1, 0, 1, False, False)
def test_a_task_not_indexed_apart_is_within_the_range_of_any_window_it_is_in(
    created_at: datetime,
    apart: int,
    rand: int,
    before_start: int,
    after_end: int,
    open_start: bool,
    open_end: bool,
) -> None:
    id_time = created_at + timedelta(microseconds=apart)
    ms = (id_time - _EPOCH) // timedelta(milliseconds=1)
    if not 0 <= ms < 1 << 48:
        return  # no UUIDv7 has that time
    after = created_at - timedelta(microseconds=before_start)
    before = created_at + timedelta(microseconds=after_end)
    low, high = id_range(None if open_start else after, None if open_end else before)
    assert low <= _id(ms, rand) <= high


def test_the_range_of_a_window_is_about_a_minute_wider_on_each_side() -> None:
    """Not wider: what lies beyond is read for nothing."""
    after, before = _utc(2026, 12, 7, 10), _utc(2026, 12, 7, 11)
    low, high = id_range(after, before)
    start = (after - _EPOCH) // timedelta(milliseconds=1)
    end = (before - _EPOCH) // timedelta(milliseconds=1)
    last = (1 << 74) - 1
    assert _id(start - 61_001, last) < low <= _id(start - 61_000)
    assert _id(end + 61_000, last) <= high < _id(end + 61_001)


def test_an_open_or_far_window_ranges_over_every_id() -> None:
    everything = (UUID(int=0), UUID(int=(1 << 128) - 1))
    assert id_range(None, None) == everything
    assert id_range(_utc(1, 1, 1), _utc(9999, 12, 31, 23, 59, 59, 999_999))[0] == everything[0]
    assert id_range(_utc(1969, 1, 1), None) == everything
    # Ends before the epoch: the range holds the first millisecond's ids, none near.
    assert id_range(None, _utc(1969, 1, 1)) == (UUID(int=0), UUID(int=(1 << 80) - 1))


# ---------------------------------------------------------------- the statement


def _index_predicate() -> str:
    sql = MIGRATION.read_text()
    return " ".join(sql.split(" WHERE ", 1)[1].rstrip().removesuffix(";").split())


def test_a_window_statement_names_the_index_predicate_word_for_word() -> None:
    """PostgreSQL reads the index of tasks apart only for a query that implies its
    predicate: the statement must repeat the migration's."""
    sql, args = list_statement(
        uuid7(),
        state="failed",
        type_=None,
        before=None,
        limit=51,
        created_after=_utc(2026, 12, 7, 10),
        created_before=None,
    )
    assert _index_predicate() in " ".join(sql.split())
    assert _utc(2026, 12, 7, 10) in args and id_range(_utc(2026, 12, 7, 10), None)[0] in args


def test_without_a_window_the_statement_is_the_page_it_was() -> None:
    tenant, last = uuid7(), uuid7()
    sql, args = list_statement(tenant, state="failed", type_="a.b", before=last, limit=51)
    assert " ".join(sql.split()) == (
        f"SELECT {' '.join(TASK_COLUMNS.split())} FROM tasks WHERE tenant_id = $1 AND state = $2"
        " AND type = $3 AND id < $4 ORDER BY id DESC LIMIT $5"
    )
    assert args == [tenant, "failed", "a.b", last, 51]
