"""How a subscription catches up: which events to replay from the stream, and when the
database row must stand in for events the stream no longer holds. Pure: no I/O.

The stream holds entries with id ``<seq>-0``; Redis trims the oldest first (MAXLEN) or
loses them all (expiry, restart without persistence), so what it returns after a seq is
one contiguous run, possibly starting too late (head lost) or ending too early (tail lost,
or not written yet: the worker commits before it writes the event)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Verdict(enum.Enum):
    NOTHING = "nothing"  # the client is up to date
    STREAM = "stream"  # the stream covers everything after the client's seq
    SNAPSHOT = "snapshot"  # the stream cannot: send the database row first


@dataclass(frozen=True)
class Plan:
    verdict: Verdict
    # Send the stream's entries with seq greater than this (after the snapshot, if any).
    stream_after: int
    # True when only the tail is missing: the writer may just be late, worth a re-read.
    tail_missing: bool = False


def row_is_next_event(delivered: int, db_last_seq: int, db_state: str) -> bool:
    """Whether the task row itself is the one event the client lacks, exactly as it was
    written: the row's latest event is rebuilt from the row, and only a running task's
    progress reports carry ``data``, which the row does not keep. The common subscribe,
    right after the task was submitted, then needs no stream read (and the API does not
    write the queued event: the worker's claim backfills it)."""
    return db_last_seq == delivered + 1 and db_state != "running"


def plan_catch_up(delivered: int, stream_seqs: Sequence[int], db_last_seq: int) -> Plan:
    """``delivered``: the client's last seq. ``stream_seqs``: the stream's seqs greater than
    ``delivered``, ascending, read *after* ``db_last_seq`` was read from the database."""
    if delivered > db_last_seq:
        # The client claims a seq the database never reached (a bogus after_seq): the
        # only trustworthy thing to send is the current state.
        return Plan(Verdict.SNAPSHOT, db_last_seq)
    run_end = delivered
    for seq in stream_seqs:
        if seq != run_end + 1:
            break
        run_end = seq
    if stream_seqs and stream_seqs[0] > delivered + 1:
        # The head is gone (trimmed or expired): the snapshot replaces it.
        return Plan(Verdict.SNAPSHOT, db_last_seq)
    if run_end < db_last_seq:
        return Plan(Verdict.SNAPSHOT, db_last_seq, tail_missing=True)
    if run_end == delivered:
        return Plan(Verdict.NOTHING, delivered)
    return Plan(Verdict.STREAM, delivered)


class LiveCheck(enum.Enum):
    SEND = "send"
    DUPLICATE = "duplicate"
    GAP = "gap"


def check_live(delivered: int, seq: int) -> LiveCheck:
    """What to do with a live event given the last seq sent on this subscription."""
    if seq <= delivered:
        return LiveCheck.DUPLICATE
    if seq == delivered + 1:
        return LiveCheck.SEND
    # Pub/sub dropped something (it is at-most-once): catch up from the stream first.
    return LiveCheck.GAP
