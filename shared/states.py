"""The task state machine of the contract, as data. Pure: no I/O."""

from __future__ import annotations

from shared.schemas import TaskState as S

# Which state may follow which. Every UPDATE in the code names its expected "from"
# state, so this table is also the list of conditional updates that exist.
TRANSITIONS: dict[S, frozenset[S]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.RETRYING, S.QUEUED}),
    S.RETRYING: frozenset({S.QUEUED, S.RUNNING, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),  # POST /retry
    S.CANCELLED: frozenset({S.QUEUED}),  # POST /retry
}


# The states a task is run again from (POST /retry, a dead letter's redrive).
RERUNNABLE: frozenset[S] = frozenset(s for s in S if s.terminal and S.QUEUED in TRANSITIONS[s])


def can_transition(current: S, new: S) -> bool:
    return new in TRANSITIONS[current]


def sources_of(new: S) -> frozenset[S]:
    """The states from which ``new`` may be reached: the WHERE of its UPDATE."""
    return frozenset(s for s, targets in TRANSITIONS.items() if new in targets)
