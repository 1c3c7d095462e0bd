"""RFC 3339 timestamps that clients send (the list's time window), read strictly: an
instant needs its timezone, and ``datetime.fromisoformat`` takes much that is not RFC
3339 ("2026-12-07", "20261207T100000", a bare local time). Pure."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

# RFC 3339 section 5.6; its ABNF strings are case-insensitive ("t", "z"). ASCII digits
# only: ``\d`` would take any script's.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)
# In a query string "+" stands for a space, so an unencoded "+01:00" arrives as " 01:00".
_PLUS_AS_SPACE = re.compile(r".*[0-9] [0-9]{2}:[0-9]{2}")

EXAMPLE = "2026-12-07T10:00:00Z"


class BadTimestamp(ValueError):
    """What is wrong with a timestamp, in words for the client."""


def parse_rfc3339(raw: str) -> datetime:
    """``raw`` as an aware datetime in UTC, or BadTimestamp saying why not.

    Fractions finer than PostgreSQL's microseconds round up: as stored values have
    whole microseconds, ``created_at >= t`` and ``created_at < t`` then mean exactly
    what they say for the ``t`` sent. A leap second (``:60``) is the next second's
    start, as PostgreSQL reads it."""
    match = _RFC3339.fullmatch(raw)
    if match is None:
        if _PLUS_AS_SPACE.fullmatch(raw):
            raise BadTimestamp("a '+' in a query string reads as a space: send it as %2B")
        raise BadTimestamp(f"not an RFC 3339 timestamp such as {EXAMPLE}")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if offset is None:
        raise BadTimestamp(f"has no timezone: end it with Z or an offset ({EXAMPLE})")
    digits = (fraction or "").ljust(6, "0")
    micros = int(digits[:6]) + (digits[6:].strip("0") != "")
    try:
        if offset in ("Z", "z"):
            tz = UTC
        else:
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            sign = -1 if offset[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        leap = int(second) == 60
        start = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second) - leap, tzinfo=tz
        )
        return (start + timedelta(seconds=leap, microseconds=micros)).astimezone(UTC)
    except ValueError:
        raise BadTimestamp("not a date and time that exists") from None
    except OverflowError:
        raise BadTimestamp("out of range (years 0001 to 9999 in UTC)") from None
