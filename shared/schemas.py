"""Versioned wire schemas: the REST bodies, the task message on RabbitMQ and the progress
event on Redis. Publishers and consumers encode and parse through the same functions here."""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
)

from shared.cron import MAX_LENGTH as CRON_MAX_LENGTH
from shared.errors import MalformedMessage, UnknownVersion


def format_ts(value: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a ``Z``, as the contract shows.

    ``isoformat``, not ``strftime``: less than half the cost, and the gateway formats
    one per event it sends."""
    if value.tzinfo is UTC:  # asyncpg's and ours: "+00:00" becomes "Z"
        return value.isoformat(timespec="milliseconds")[:-6] + "Z"
    utc = value.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds") + "Z"


Timestamp = Annotated[datetime, PlainSerializer(format_ts, return_type=str, when_used="json")]
# A task type's name, the one rule for the API (TaskType, the OpenAPI document) and
# the worker SDK (is_task_type): a worker must not register a type no request can name.
TASK_TYPE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$"
TASK_TYPE_MAX_LENGTH = 128
TASK_TYPE_RULE = "1 to 128 characters of A-Z a-z 0-9 _ . : -, the first not . : or -"
TaskType = Annotated[
    str,
    StringConstraints(min_length=1, max_length=TASK_TYPE_MAX_LENGTH, pattern=TASK_TYPE_PATTERN),
]
_TASK_TYPE_RE = re.compile(TASK_TYPE_PATTERN)


def is_task_type(name: object) -> bool:
    """Whether ``name`` is a task type name TaskType accepts. ``fullmatch``: ``$`` alone
    would let a trailing newline through, which pydantic's pattern does not."""
    return (
        isinstance(name, str)
        and len(name) <= TASK_TYPE_MAX_LENGTH
        and _TASK_TYPE_RE.fullmatch(name) is not None
    )


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- REST requests


class BackoffSpec(_Strict):
    """Retry delays of one task: full jitter in [0, min(cap_s, base_s * factor**(n-1))]."""

    # Strict, as TaskRequest: a client's "2" or true is not a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    base_s: float = Field(default=1.0, ge=0, le=3600)
    factor: float = Field(default=2.0, ge=1, le=10)
    cap_s: float = Field(default=600.0, ge=0, le=24 * 3600)


# Fields of a task request that a schedule's tasks take too, with the same bounds.
Priority = Annotated[
    int,
    Field(
        ge=0,
        le=9,
        description="5 or more: the high lane; a worker starts it in a slot reserved for"
        " the high lane, or before the tasks below 5 that wait for its slots. FIFO within"
        " a lane.",
    ),
]
MaxAttempts = Annotated[
    int,
    Field(
        ge=1,
        le=100,
        description="When absent: the type's own (`@task(max_attempts=...)`), else 5.",
    ),
]
TimeoutS = Annotated[
    float,
    Field(
        gt=0,
        le=7 * 24 * 3600,
        description="Seconds per attempt. When absent: the type's own"
        " (`@task(timeout_s=...)`), else 600.",
    ),
]


class TaskRequest(_Strict):
    """Body of ``POST /v1/tasks``: only ``type`` is required."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        # The contract's types as the OpenAPI document states them: "3" and true are
        # not integers (lax mode took them as 3 and 1).
        strict=True,
        json_schema_extra={
            "examples": [
                {"type": "demo.sleep", "args": {"seconds": 5, "steps": 10}},
                {"type": "demo.noop"},
            ]
        },
    )

    type: TaskType
    args: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = 0
    max_attempts: MaxAttempts = 5
    timeout_s: TimeoutS = 600.0
    delay_s: float = Field(default=0.0, ge=0, le=30 * 24 * 3600)
    # Overrides the retry backoff of the task's type and of the worker (an addition to
    # the contract's request).
    backoff: BackoffSpec | None = None


class BatchRequest(_Strict):
    """Body of ``POST /v1/tasks:batch``: all tasks are accepted or none."""

    tasks: list[TaskRequest] = Field(min_length=1, max_length=1000)


# A schedule's name: what its tenant calls it, unique among the tenant's schedules.
ScheduleName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"),
    Field(description="Unique among the tenant's schedules; no control characters."),
]
CronText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=CRON_MAX_LENGTH),
    Field(
        description="Five fields, read in UTC: minute hour day-of-month month day-of-week"
        " (`0 6 * * *`: every day at 06:00 UTC), as crontab(5): `*`, lists `a,b`, ranges"
        " `a-b`, steps `*/n` and `a-b/n`, month and day names, 0 or 7 for Sunday; when"
        " both day fields are restricted, a day matching either fires. Also `@hourly`,"
        " `@daily`, `@weekly`, `@monthly`, `@yearly`."
    ),
]


class ScheduleRequest(_Strict):
    """Body of ``POST /v1/schedules``: a task to make each time ``cron`` fires, as a
    task request says it (without ``delay_s`` and ``backoff``)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "daily report",
                    "cron": "0 6 * * *",
                    "type": "report.daily",
                    "args": {"format": "pdf"},
                }
            ]
        },
    )

    name: ScheduleName
    cron: CronText
    type: TaskType
    args: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = 0
    # None: each fire's task gets its type's own, else the task request's default.
    max_attempts: MaxAttempts | None = None
    timeout_s: TimeoutS | None = None
    enabled: bool = Field(default=True, description="false: it makes no task until enabled.")

    def task(self) -> TaskRequest:
        """The request each fire makes, before its type's defaults."""
        return schedule_task(self.type, self.args, self.priority, self.max_attempts, self.timeout_s)


def schedule_task(
    type: str,
    args: dict[str, Any],
    priority: int,
    max_attempts: int | None,
    timeout_s: float | None,
) -> TaskRequest:
    """The task request of a schedule's fire, before its type's defaults: only the
    attempts and timeout the schedule sets count as the request's own. Raises
    ValidationError for values a task request refuses."""
    fields: dict[str, Any] = {"type": type, "args": args, "priority": priority}
    if max_attempts is not None:
        fields["max_attempts"] = max_attempts
    if timeout_s is not None:
        fields["timeout_s"] = timeout_s
    return TaskRequest.model_validate(fields)


class ScheduleUpdate(_Strict):
    """Body of ``PATCH /v1/schedules/{id}``: what to change. A field left out (or
    null) stays as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    enabled: bool | None = Field(
        default=None,
        description="false: it makes no task until enabled again; true again: it next"
        " fires at the first fire time after now (none for the time it was disabled).",
    )
    cron: CronText | None = Field(
        default=None,
        description="A new expression: it next fires at its first fire time after now.",
    )
    args: dict[str, Any] | None = Field(
        default=None, description="The args of its next tasks, in place of the old ones."
    )


class WsTokenRequest(_Strict):
    """Optional body of ``POST /v1/ws-tokens``: with ``task_id``, a task token (the SSE
    stream of that task only, reusable until it expires) instead of a single-use one."""

    task_id: UUID | None = None


# ---------------------------------------------------------------- REST responses


class TaskError(BaseModel):
    type: str
    message: str
    retryable: bool


class TaskLinks(BaseModel):
    self: str
    events: str


class Task(BaseModel):
    """The Task object of the contract."""

    id: UUID
    type: str
    args: dict[str, Any]
    state: TaskState
    progress: float
    message: str | None
    result: Any
    error: TaskError | None
    attempts: int
    max_attempts: int
    priority: int
    # Seconds per attempt, as the task runs them (the request's, else its type's, else
    # the default): a client that set none can see what applies.
    timeout_s: float
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    updated_at: Timestamp
    next_attempt_at: Timestamp | None = None
    last_seq: int
    # The W3C trace id its logs and events carry (the request's traceparent's, else new).
    trace_id: str | None = None
    links: TaskLinks


class TaskPage(BaseModel):
    items: list[Task]
    next_cursor: str | None


class TaskBatch(BaseModel):
    tasks: list[Task]


class ScheduleLinks(BaseModel):
    self: str


class Schedule(BaseModel):
    """A periodic task: what ``POST /v1/schedules`` stored, and its fires so far."""

    id: UUID
    name: str
    cron: str
    type: str
    args: dict[str, Any]
    priority: int
    # null: each task gets its type's own, else the task request's default.
    max_attempts: int | None
    timeout_s: float | None
    enabled: bool
    # When it fires next (UTC); null while disabled.
    next_run_at: Timestamp | None
    # The fire time of its last task, and that task's id.
    last_run_at: Timestamp | None
    last_task_id: UUID | None
    # Why its last fire made no task (its type no longer registered, its args refused
    # by the type's schema); null once a fire makes one.
    last_error: str | None
    created_at: Timestamp
    updated_at: Timestamp
    links: ScheduleLinks


class SchedulePage(BaseModel):
    items: list[Schedule]
    next_cursor: str | None


class ProblemError(BaseModel):
    loc: list[str | int]
    msg: str


def summary(errors: Sequence[ProblemError], whole: Sequence[str | int] = ()) -> str:
    """A problem's detail from its first errors: "body.args.n: must be ..." each. An
    error at ``whole`` itself (the body) is its message alone, which names it."""
    detail = "; ".join(
        err.msg if len(err.loc) == len(whole) else f"{'.'.join(map(str, err.loc))}: {err.msg}"
        for err in errors[:3]
    )
    return detail + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    errors: list[ProblemError] | None = None
    # An extension member: the X-Request-ID of the response, to find its logs.
    request_id: str | None = None


# ---------------------------------------------------------------- RabbitMQ


class TaskMessage(_Strict):
    """What the outbox relay publishes and a worker consumes: a pointer to the task row,
    which stays the truth. One message per attempt; ``attempt`` fences stale copies."""

    v: Literal[1] = 1
    task_id: UUID
    tenant_id: UUID
    type: TaskType
    attempt: int = Field(ge=1)
    trace_id: str | None = Field(default=None, max_length=64)


TASK_MESSAGE_VERSIONS = frozenset({1})


def encode_task_message(message: TaskMessage) -> bytes:
    return message.model_dump_json().encode()


def parse_task_message(body: bytes) -> TaskMessage:
    """Parse a task message or raise a MessageError naming why it can never be processed."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedMessage("not a JSON object")
    version = raw.get("v")
    # type() and not isinstance: True and 1.0 compare equal to 1 but are not versions.
    if type(version) is not int or version not in TASK_MESSAGE_VERSIONS:
        raise UnknownVersion(
            f"schema version {version!r} is not one of {sorted(TASK_MESSAGE_VERSIONS)}"
        )
    try:
        return TaskMessage.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise MalformedMessage(f"{loc}: {first['msg']}") from None


# ---------------------------------------------------------------- Redis progress events


class ProgressEvent(BaseModel):
    """One step of a task's story. ``seq`` starts at 1 and grows by 1 per event, across
    attempts and workers; the database assigns it, so the order is the commit order."""

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    task_id: UUID
    seq: int = Field(ge=1)
    state: TaskState
    progress: float = Field(ge=0.0, le=1.0)
    message: str | None = None
    data: Any = None
    attempt: int = Field(default=0, ge=0)
    ts: Timestamp
    snapshot: bool = False
    # The trace of the request that submitted the task (DESIGN promise 7: one trace from
    # the HTTP request to the WebSocket frame).
    trace_id: str | None = Field(default=None, max_length=64)


def encode_event(event: ProgressEvent) -> bytes:
    """The event as pydantic's ``model_dump_json`` writes it, from a dict by orjson: 3.0
    µs against 3.6, and the worker encodes two or three events per task. ``data`` that
    orjson would write otherwise or not at all (a datetime, a set, a key that is not a
    string) raises TypeError, and pydantic writes that event."""
    try:
        return orjson.dumps(
            {
                "v": event.v,
                "task_id": str(event.task_id),  # asyncpg's UUID subclass is not orjson's
                "seq": event.seq,
                "state": event.state.value,
                "progress": event.progress,
                "message": event.message,
                "data": event.data,
                "attempt": event.attempt,
                "ts": format_ts(event.ts),
                "snapshot": event.snapshot,
                "trace_id": event.trace_id,
            },
            option=orjson.OPT_PASSTHROUGH_DATETIME,
        )
    except TypeError:
        return event.model_dump_json().encode()


def parse_event(body: bytes | str) -> ProgressEvent:
    """Parse an event from Redis; raise MalformedMessage on anything else."""
    try:
        return ProgressEvent.model_validate_json(body)
    except ValidationError as exc:
        raise MalformedMessage(str(exc.errors()[0]["msg"])) from None
