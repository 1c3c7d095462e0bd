"""Cron expressions, the five fields of crontab(5), read in UTC, and the next time one
fires: when a schedule makes its next task. Pure.

Fields, in order: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or
jan-dec), day of week (0-7 or sun-sat; 0 and 7 are both Sunday). Each is a list
``a,b`` of items; an item is ``*``, a value, a range ``a-b``, or ``*`` or a range with
a step (``*/15``, ``8-18/2``). Names are case-insensitive. ``@hourly``, ``@daily``
(``@midnight``), ``@weekly``, ``@monthly`` and ``@yearly`` (``@annually``) stand for
their usual expressions.

As crontab(5) says: when both day fields are restricted (neither starts with ``*``),
a day matching either one fires; otherwise a day must match both. So ``0 0 1,15 * 1``
fires on the 1st, the 15th and every Monday, while ``0 0 */2 * 1`` fires on Mondays of
odd date only.

Errors are CronError (a ValueError) with a message that names the field and says what
is wrong with it, fit to show to whoever wrote the expression."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

# The longest an expression may be: real ones are a few dozen characters.
MAX_LENGTH = 200

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# Each month's longest: February's 29 (a leap year's) counts, so "29 2" fires.
_MAX_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
# Any expression that parses fires within this many years (a leap day on a given day
# of the week recurs within 40; the Gregorian calendar repeats every 400): past it,
# next_after gives up rather than loop.
_HORIZON_YEARS = 400


class CronError(ValueError):
    """An expression that is not a cron expression this module reads, or never fires."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    # The first value that ``names[0]`` stands for.
    first_name_value: int = 0


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, _MONTHS, 1),
    # 7 is Sunday too (folded into 0 once parsed).
    _Field("day of week", 0, 7, _DAYS, 0),
)


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the values each field allows, sorted."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    # 0 is Sunday, 6 Saturday.
    weekdays: tuple[int, ...]
    # Both day fields restricted: a day matching either fires (crontab(5)).
    either_day: bool

    def day_matches(self, day: date) -> bool:
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays  # Python's Monday is 0
        return (in_month or in_week) if self.either_day else (in_month and in_week)

    def next_after(self, t: datetime) -> datetime:
        """The first fire time strictly after ``t`` (an aware datetime), in UTC, on a
        whole minute."""
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError("t must be an aware datetime (UTC)")
        at = t.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        horizon = at.year + _HORIZON_YEARS
        while at.year <= horizon:
            if at.month not in self.months:
                at = _first_of_next_month(at)
                continue
            # The day's first allowed hour from now on, if the day fires at all.
            hour = _at_or_after(self.hours, at.hour) if self.day_matches(at.date()) else None
            if hour is None:
                at = _midnight(at) + timedelta(days=1)
            elif hour != at.hour:
                at = at.replace(hour=hour, minute=0)
            elif (minute := _at_or_after(self.minutes, at.minute)) is None:
                at = at.replace(minute=0) + timedelta(hours=1)
            else:
                return at.replace(minute=minute)
        # parse() refuses expressions that never fire: unreachable unless it is wrong.
        raise CronError(f"{self.expression!r} does not fire within {_HORIZON_YEARS} years")


def parse(expression: str) -> Cron:
    """The expression parsed, or CronError saying what is wrong with it."""
    if len(expression) > MAX_LENGTH:
        raise CronError(f"longer than {MAX_LENGTH} characters")
    text = _MACROS.get(expression.strip().lower(), expression)
    if text.strip().startswith("@"):
        raise CronError(
            f"unknown shorthand {expression.strip()!r}: one of {', '.join(sorted(_MACROS))}"
        )
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise CronError(
            f"{len(parts)} fields; a cron expression has 5: minute, hour, day of month,"
            " month, day of week (as in 0 6 * * *)"
        )
    minutes, hours, days, months, weekdays = (
        _values(part, field) for part, field in zip(parts, _FIELDS, strict=True)
    )
    weekdays = {d % 7 for d in weekdays}
    # crontab(5): a day field is restricted unless it starts with "*".
    either_day = not parts[2].startswith("*") and not parts[4].startswith("*")
    if not either_day and not any(d <= _MAX_DAYS[m] for m in months for d in days):
        raise CronError(
            f"never fires: no month of {parts[3]!r} has a day of {parts[2]!r}"
            f" (the longest {'is' if len(months) == 1 else 'are'}"
            f" {max(_MAX_DAYS[m] for m in months)} days)"
        )
    return Cron(
        expression=expression,
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=tuple(sorted(days)),
        months=tuple(sorted(months)),
        weekdays=tuple(sorted(weekdays)),
        either_day=either_day,
    )


def next_after(expression: str | Cron, t: datetime) -> datetime:
    """The first time ``expression`` fires strictly after ``t`` (aware), in UTC."""
    cron = expression if isinstance(expression, Cron) else parse(expression)
    return cron.next_after(t)


def _values(text: str, field: _Field) -> set[int]:
    """The values one field's text allows."""
    found: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(f"{field.name} {text!r}: an empty item in the list")
        found |= _item(item, field, text)
    return found


def _item(item: str, field: _Field, whole: str) -> set[int]:
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        parsed = _number(step_text)
        if parsed is None or parsed < 1:
            raise CronError(f"{field.name} {whole!r}: the step {step_text!r} is not a number >= 1")
        step = parsed
    if base == "*":
        return set(range(field.low, field.high + 1, step))
    low_text, dash, high_text = base.partition("-")
    low = _value(low_text, field, whole)
    if not dash:
        if slash:
            raise CronError(
                f"{field.name} {whole!r}: a step needs * or a range before it"
                f" (*/{step} or {low}-{field.high}/{step})"
            )
        return {low}
    high = _value(high_text, field, whole)
    if low > high:
        raise CronError(
            f"{field.name} {whole!r}: the range {base!r} runs backwards"
            f" (ranges go from low to high and do not wrap around)"
        )
    return set(range(low, high + 1, step))


def _value(text: str, field: _Field, whole: str) -> int:
    number = _number(text)
    if number is None and text.lower() in field.names:
        number = field.names.index(text.lower()) + field.first_name_value
    if number is None:
        names = f" or a name ({field.names[0]}-{field.names[-1]})" if field.names else ""
        raise CronError(f"{field.name} {whole!r}: {text!r} is not a number{names}")
    if not field.low <= number <= field.high:
        raise CronError(
            f"{field.name} {whole!r}: {number} is out of range ({field.low}-{field.high})"
        )
    return number


def _number(text: str) -> int | None:
    """Decimal digits (ASCII only: int() takes "٣" and "+3") as a number, else None."""
    if not text or not text.isascii() or not text.isdigit() or len(text) > 4:
        return None
    return int(text)


def _at_or_after(values: tuple[int, ...], value: int) -> int | None:
    """The first of the sorted ``values`` at or after ``value``, or None."""
    i = bisect.bisect_left(values, value)
    return values[i] if i < len(values) else None


def _midnight(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0)


def _first_of_next_month(t: datetime) -> datetime:
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return t.replace(year=year, month=month, day=1, hour=0, minute=0)
