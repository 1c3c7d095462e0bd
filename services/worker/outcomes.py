"""How attempts end, as the worker decides it and as operators count it: per task
type, the attempts by outcome, their run time, and how long the task waited queued
before a worker claimed it (what to autoscale and alert on)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

ATTEMPTS = Counter(
    "longhaul_worker_attempts_total",
    "Attempts ended, by task type and outcome: succeeded; failed; retrying (another"
    " attempt follows); exhausted (failed with its attempts run out, kept as a dead"
    " letter); cancelled; interrupted (handed back: the worker stopped, or its lease"
    " lapsed); fenced (no longer this worker's when it ended: reaped)",
    ["type", "outcome"],
)
ATTEMPT_SECONDS = Histogram(
    "longhaul_worker_attempt_seconds",
    "Time from an attempt's claim to its outcome, by task type",
    ["type"],
    buckets=(0.01, 0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
QUEUE_WAIT_SECONDS = Histogram(
    "longhaul_worker_queue_wait_seconds",
    "Time a task waited to be claimed since it was due (queued, or its delay or backoff"
    " over), by the database's clock, by task type",
    ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


@dataclass(frozen=True)
class Outcome:
    state: str  # succeeded | failed | cancelled | interrupted
    result: Any = None
    error: dict[str, Any] | None = None
    retryable: bool = False

    def ending(self, attempt: int, max_attempts: int) -> str:
        """What the attempt's end is to be: ``state``, or for a retryable failure
        ``retrying`` while attempts are left and ``exhausted`` after. Pure."""
        if self.state != "failed" or not self.retryable:
            return self.state
        return "retrying" if attempt < max_attempts else "exhausted"


@dataclass
class Counted:
    """The metrics' children per task type, looked up once: a labels() call per task
    and metric costs more than the count itself."""

    _types: dict[str, tuple[Histogram, Histogram]] = field(default_factory=dict)
    _attempts: dict[tuple[str, str], Counter] = field(default_factory=dict)

    def claimed(self, task_type: str, queued_s: float) -> None:
        self._of(task_type)[0].observe(max(0.0, queued_s))

    def ended(self, task_type: str, ending: str, run_s: float) -> None:
        counter = self._attempts.get((task_type, ending))
        if counter is None:
            counter = self._attempts[task_type, ending] = ATTEMPTS.labels(task_type, ending)
        counter.inc()
        self._of(task_type)[1].observe(run_s)

    def _of(self, task_type: str) -> tuple[Histogram, Histogram]:
        children = self._types.get(task_type)
        if children is None:
            children = self._types[task_type] = (
                QUEUE_WAIT_SECONDS.labels(task_type),
                ATTEMPT_SECONDS.labels(task_type),
            )
        return children
