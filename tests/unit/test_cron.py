"""Cron expressions (shared/cron.py): what each field allows, the day rule of
crontab(5), the next fire time across month ends, leap days and year ends, and the
errors a bad expression gets."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cron import Cron, CronError, next_after, parse


def at(text: str) -> datetime:
    """``2024-02-28 23:59`` as an aware UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def fires(expression: str, start: str, count: int) -> list[str]:
    """The first ``count`` fire times after ``start``, as ``YYYY-MM-DD HH:MM``."""
    cron = parse(expression)
    out, t = [], at(start)
    for _ in range(count):
        t = cron.next_after(t)
        out.append(t.strftime("%Y-%m-%d %H:%M"))
    return out


def brute_next(cron: Cron, t: datetime) -> datetime:
    """The next fire time by trying every minute (of the days that fire at all): the
    definition next_after must meet."""
    m = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while True:
        if m.month not in cron.months or not cron.day_matches(m.date()):
            m = m.replace(hour=0, minute=0) + timedelta(days=1)
        elif m.hour in cron.hours and m.minute in cron.minutes:
            return m
        else:
            m += timedelta(minutes=1)


# ---------------------------------------------------------------- fields


def test_a_star_allows_every_value_of_its_field() -> None:
    cron = parse("* * * * *")
    assert cron.minutes == tuple(range(60))
    assert cron.hours == tuple(range(24))
    assert cron.days == tuple(range(1, 32))
    assert cron.months == tuple(range(1, 13))
    assert cron.weekdays == tuple(range(7))


def test_lists_ranges_and_steps() -> None:
    cron = parse("0,15,45 8-11 1-31/10 */5 1-5/2")
    assert cron.minutes == (0, 15, 45)
    assert cron.hours == (8, 9, 10, 11)
    assert cron.days == (1, 11, 21, 31)
    assert cron.months == (1, 6, 11)
    assert cron.weekdays == (1, 3, 5)


def test_a_step_over_a_star_starts_at_the_fields_low_end() -> None:
    """*/n counts from the field's first value: minutes from 0, days and months from 1."""
    cron = parse("*/20 */7 */15 */4 *")
    assert cron.minutes == (0, 20, 40)
    assert cron.hours == (0, 7, 14, 21)
    assert cron.days == (1, 16, 31)
    assert cron.months == (1, 5, 9)


def test_a_step_larger_than_its_range_keeps_the_first_value() -> None:
    assert parse("*/60 * * * *").minutes == (0,)
    assert parse("10-20/30 * * * *").minutes == (10,)


def test_list_items_may_overlap_and_combine_ranges_and_steps() -> None:
    assert parse("1-5,3-8/2,59 * * * *").minutes == (1, 2, 3, 4, 5, 7, 59)


def test_names_of_months_and_days_any_case() -> None:
    cron = parse("0 0 * JAN,mar-May,Dec mon-FRI")
    assert cron.months == (1, 3, 4, 5, 12)
    assert cron.weekdays == (1, 2, 3, 4, 5)
    assert parse("0 0 * * sun").weekdays == (0,)
    assert parse("0 0 * * sat").weekdays == (6,)


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN"])
def test_day_of_week_0_and_7_are_both_sunday(sunday: str) -> None:
    cron = parse(f"0 12 * * {sunday}")
    assert cron.weekdays == (0,)
    # 2024-03-03 was a Sunday.
    assert fires(f"0 12 * * {sunday}", "2024-02-28 00:00", 2) == [
        "2024-03-03 12:00",
        "2024-03-10 12:00",
    ]


def test_a_range_up_to_7_ends_on_sunday() -> None:
    assert parse("0 0 * * 5-7").weekdays == (0, 5, 6)
    assert parse("0 0 * * 0-7").weekdays == tuple(range(7))
    assert parse("0 0 * * 6,7").weekdays == (0, 6)


def test_shorthands() -> None:
    for shorthand, same in [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@DAILY", "0 0 * * *"),
    ]:
        a, b = parse(shorthand), parse(same)
        assert (a.minutes, a.hours, a.days, a.months, a.weekdays, a.either_day) == (
            b.minutes,
            b.hours,
            b.days,
            b.months,
            b.weekdays,
            b.either_day,
        ), shorthand
        assert a.expression == shorthand


def test_fields_may_be_separated_by_any_white_space() -> None:
    assert parse("  0\t6  * *\n* ").hours == (6,)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("expression", "says"),
    [
        ("", "0 fields"),
        ("* * * *", "4 fields"),
        ("* * * * * *", "6 fields"),
        ("60 * * * *", "minute '60': 60 is out of range (0-59)"),
        ("* 24 * * *", "hour '24': 24 is out of range (0-23)"),
        ("* * 0 * *", "day of month '0': 0 is out of range (1-31)"),
        ("* * 32 * *", "day of month '32': 32 is out of range (1-31)"),
        ("* * * 0 *", "month '0': 0 is out of range (1-12)"),
        ("* * * 13 *", "month '13': 13 is out of range (1-12)"),
        ("* * * * 8", "day of week '8': 8 is out of range (0-7)"),
        ("5-3 * * * *", "the range '5-3' runs backwards"),
        ("* 22-2 * * *", "the range '22-2' runs backwards"),
        ("* * * * fri-sun", "the range 'fri-sun' runs backwards"),
        ("*/0 * * * *", "the step '0' is not a number >= 1"),
        ("*/ * * * *", "the step '' is not a number >= 1"),
        ("*/x * * * *", "the step 'x' is not a number >= 1"),
        ("5/15 * * * *", "a step needs * or a range before it (*/15 or 5-59/15)"),
        ("1,,2 * * * *", "an empty item"),
        (",1 * * * *", "an empty item"),
        ("a * * * *", "minute 'a': 'a' is not a number"),
        ("* * * foo *", "'foo' is not a number or a name (jan-dec)"),
        ("* * * * mon-foo", "'foo' is not a number or a name (sun-sat)"),
        ("* * jan * *", "day of month 'jan': 'jan' is not a number"),
        ("-1 * * * *", "'' is not a number"),
        ("+1 * * * *", "'+1' is not a number"),
        ("1.5 * * * *", "'1.5' is not a number"),
        ("\u0663 * * * *", "is not a number"),  # an Arabic-Indic three: int() takes it
        ("99999 * * * *", "is not a number"),
        ("1-2-3 * * * *", "'2-3' is not a number"),
        ("*/5/5 * * * *", "the step '5/5' is not a number >= 1"),
        ("@reboot", "unknown shorthand '@reboot'"),
        ("@every 5m", "unknown shorthand"),
        ("0 0 30 2 *", "never fires: no month of '2' has a day of '30' (the longest is 29 days)"),
        ("0 0 31 4,6,9,11 *", "never fires"),
        # The day of week starts with *: days must match both fields, and none can.
        (
            "0 0 31 2,4 */2",
            "never fires: no month of '2,4' has a day of '31' (the longest are 30 days)",
        ),
        ("x" * 201, "longer than 200"),
    ],
)
def test_bad_expressions_are_refused_with_a_reason(expression: str, says: str) -> None:
    with pytest.raises(CronError) as info:
        parse(expression)
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_day_that_never_comes_alone_is_fine_when_the_week_may_fire() -> None:
    """Both day fields restricted: February 30 never comes, but Mondays do."""
    assert fires("0 0 30 2 mon", "2024-02-01 00:00", 2) == ["2024-02-05 00:00", "2024-02-12 00:00"]
    assert fires("0 0 31 2,4 1-5/9", "2024-02-01 00:00", 1) == ["2024-02-05 00:00"]


def test_next_after_wants_an_aware_time() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_after("* * * * *", datetime(2024, 1, 1))  # naive


# ---------------------------------------------------------------- next fire time


def test_the_next_fire_is_strictly_after_the_time_given() -> None:
    """On a fire minute itself, the next fire is the following one; seconds past a
    minute belong to that minute."""
    assert fires("0 6 * * *", "2024-05-01 06:00", 1) == ["2024-05-02 06:00"]
    assert fires("0 6 * * *", "2024-05-01 05:59", 1) == ["2024-05-01 06:00"]
    t = datetime(2024, 5, 1, 5, 59, 59, 999999, tzinfo=UTC)
    assert next_after("0 6 * * *", t) == at("2024-05-01 06:00")
    t = datetime(2024, 5, 1, 6, 0, 0, 1, tzinfo=UTC)
    assert next_after("0 6 * * *", t) == at("2024-05-02 06:00")


def test_every_minute() -> None:
    assert fires("* * * * *", "2024-12-31 23:58", 3) == [
        "2024-12-31 23:59",
        "2025-01-01 00:00",
        "2025-01-01 00:01",
    ]


def test_daily_at_six_utc() -> None:
    assert fires("0 6 * * *", "2024-02-28 07:00", 3) == [
        "2024-02-29 06:00",
        "2024-03-01 06:00",
        "2024-03-02 06:00",
    ]


def test_the_result_is_utc_whatever_the_zone_of_the_time_given() -> None:
    """06:00 UTC is 08:00 in UTC+2: given 07:00 there (05:00 UTC), the fire is the
    same day's, expressed in UTC."""
    plus_two = timezone(timedelta(hours=2))
    got = next_after("0 6 * * *", datetime(2024, 7, 1, 7, 0, tzinfo=plus_two))
    assert got == at("2024-07-01 06:00") and got.tzinfo is UTC


def test_steps_within_the_hour() -> None:
    assert fires("*/15 * * * *", "2024-01-01 10:50", 4) == [
        "2024-01-01 11:00",
        "2024-01-01 11:15",
        "2024-01-01 11:30",
        "2024-01-01 11:45",
    ]
    assert fires("10-30/10 9-10 * * *", "2024-01-01 09:25", 4) == [
        "2024-01-01 09:30",
        "2024-01-01 10:10",
        "2024-01-01 10:20",
        "2024-01-01 10:30",
    ]


def test_leap_day_fires_only_in_leap_years() -> None:
    assert fires("0 0 29 2 *", "2023-03-01 00:00", 3) == [
        "2024-02-29 00:00",
        "2028-02-29 00:00",
        "2032-02-29 00:00",
    ]


def test_leap_day_skips_a_century_that_is_not_a_leap_year() -> None:
    """2100 is no leap year (divisible by 100, not by 400); 2000 was."""
    assert fires("0 0 29 2 *", "2096-03-01 00:00", 1) == ["2104-02-29 00:00"]
    assert fires("0 0 29 2 *", "1999-01-01 00:00", 1) == ["2000-02-29 00:00"]


def test_a_leap_day_on_a_given_weekday_is_found_decades_ahead() -> None:
    """With the day of week starting with * (``*/7``: 0 and 7, Sunday), a day must
    match both fields: a February 29 that is a Sunday, 28 years apart, and 40 across
    2100, which is no leap year."""
    assert fires("0 0 29 2 */7", "2024-03-01 00:00", 4) == [
        "2032-02-29 00:00",
        "2060-02-29 00:00",
        "2088-02-29 00:00",
        "2128-02-29 00:00",
    ]


def test_the_31st_skips_the_months_without_one() -> None:
    assert fires("30 23 31 * *", "2024-01-31 23:30", 4) == [
        "2024-03-31 23:30",
        "2024-05-31 23:30",
        "2024-07-31 23:30",
        "2024-08-31 23:30",
    ]


def test_the_30th_skips_february() -> None:
    assert fires("0 0 30 * *", "2024-01-30 00:00", 2) == ["2024-03-30 00:00", "2024-04-30 00:00"]


def test_month_ends_and_the_year_end() -> None:
    assert fires("59 23 28-31 2,12 *", "2023-02-27 00:00", 6) == [
        "2023-02-28 23:59",
        "2023-12-28 23:59",
        "2023-12-29 23:59",
        "2023-12-30 23:59",
        "2023-12-31 23:59",
        "2024-02-28 23:59",
    ]
    assert fires("0 0 1 1 *", "2024-12-31 23:59", 1) == ["2025-01-01 00:00"]


def test_months_by_name_skip_to_the_next_allowed_month() -> None:
    assert fires("0 9 1 mar,sep *", "2024-03-01 09:00", 3) == [
        "2024-09-01 09:00",
        "2025-03-01 09:00",
        "2025-09-01 09:00",
    ]


def test_either_day_field_fires_when_both_are_restricted() -> None:
    """``0 0 13 * 5``: every Friday and every 13th, not only Friday the 13th."""
    # 2024-09-13 was a Friday; 2024-10-13 a Sunday.
    assert fires("0 0 13 * 5", "2024-09-12 00:00", 6) == [
        "2024-09-13 00:00",
        "2024-09-20 00:00",
        "2024-09-27 00:00",
        "2024-10-04 00:00",
        "2024-10-11 00:00",
        "2024-10-13 00:00",
    ]


def test_a_day_field_starting_with_a_star_makes_the_days_match_both() -> None:
    """crontab(5): "restricted" means not starting with *: */2 restricts nothing for
    the rule, so the days must be odd dates and Fridays."""
    cron = parse("0 0 */2 * 5")
    assert not cron.either_day
    # Fridays of September 2024: 6, 13, 20, 27; odd: 13 and 27.
    assert fires("0 0 */2 * 5", "2024-09-01 00:00", 2) == ["2024-09-13 00:00", "2024-09-27 00:00"]
    assert not parse("0 0 1 * *").either_day
    assert not parse("0 0 * * 1").either_day
    assert parse("0 0 1 * 1").either_day


def test_weekdays_only() -> None:
    # 2024-06-07 was a Friday.
    assert fires("30 8 * * mon-fri", "2024-06-07 09:00", 3) == [
        "2024-06-10 08:30",
        "2024-06-11 08:30",
        "2024-06-12 08:30",
    ]


# A few expressions of every kind, checked against the brute-force definition.
_EXPRESSIONS = [
    "* * * * *",
    "*/7 * * * *",
    "0 */5 * * *",
    "15 3 1,15 * *",
    "0 0 13 * 5",
    "0 0 */2 * 5",
    "0 12 * 2 0",
    "0 0 31 * *",
    "0 0 29 2 *",
    "5-10/2 22-23 * 12 6,7",
    "0 6 * * *",
    "@monthly",
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(_EXPRESSIONS),
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1)),
)
def test_next_after_is_the_first_matching_minute(expression: str, naive: datetime) -> None:
    """For any time, the next fire is the first whole minute after it that every field
    allows: what trying each minute in turn gives."""
    cron = parse(expression)
    t = naive.replace(tzinfo=UTC)
    assert cron.next_after(t) == brute_next(cron, t)


def test_fire_times_increase_and_none_is_skipped_over_a_year() -> None:
    """Walking a year of ``*/30 9-17 * * mon-fri`` gives every half hour of each
    working day, in order: 2024 had 262 weekdays of 18 fires each."""
    cron = parse("*/30 9-17 * * mon-fri")
    t, times = at("2023-12-31 23:59"), []
    while True:
        t = cron.next_after(t)
        if t.year > 2024:
            break
        times.append(t)
    assert times == sorted(set(times))
    assert len(times) == 262 * 18
    by_day = {
        day: len(list(group)) for day, group in itertools.groupby(times, key=lambda x: x.date())
    }
    assert set(by_day.values()) == {18}
    assert all(day.weekday() < 5 for day in by_day)
