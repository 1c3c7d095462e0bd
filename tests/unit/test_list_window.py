"""The task list's time window, its pure parts: the id range a window reads, and the
statement that goes with it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

from hypothesis import example, given
from hypothesis import strategies as st

from services.api.repository import TASK_COLUMNS, id_range, list_statement
from shared.ids import uuid7

MIGRATION = Path(__file__).resolve().parents[2] / "shared/migrations/0014_tasks_id_time_apart.sql"


def _utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


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
