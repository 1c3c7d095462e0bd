"""The wire and REST schemas of shared/schemas.py: defaults, limits, round trips and the
errors that decide whether a message is dead-lettered."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import orjson
import pytest
from pydantic import ValidationError

from shared.errors import MalformedMessage, MessageError, UnknownVersion
from shared.ids import uuid7
from shared.schemas import (
    BatchRequest,
    ProgressEvent,
    TaskMessage,
    TaskRequest,
    TaskState,
    encode_event,
    encode_task_message,
    format_ts,
    parse_event,
    parse_task_message,
)


def _message_dict(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "v": 1,
        "task_id": str(uuid7()),
        "tenant_id": str(uuid7()),
        "type": "demo.noop",
        "attempt": 1,
    }
    raw.update(overrides)
    return raw


# ---------------------------------------------------------------- TaskRequest


def test_task_request_defaults() -> None:
    """Only ``type`` is required; the other fields take the contract's defaults."""
    req = TaskRequest.model_validate({"type": "demo.noop"})
    assert req.args == {}
    assert (req.priority, req.max_attempts, req.timeout_s, req.delay_s) == (0, 5, 600.0, 0.0)


@pytest.mark.parametrize(
    "field",
    [
        {"priority": -1},
        {"priority": 10},
        {"max_attempts": 0},
        {"max_attempts": 101},
        {"timeout_s": 0},
        {"timeout_s": 7 * 24 * 3600 + 1},
        {"delay_s": -0.1},
        {"delay_s": 30 * 24 * 3600 + 1},
        {"type": ""},
        {"type": "has space"},
        {"type": "x" * 129},
        {"type": ".leading-dot"},
        {"args": [1, 2]},
    ],
)
def test_task_request_limits_are_enforced(field: dict[str, object]) -> None:
    """Out-of-range or malformed fields are refused, naming the field."""
    body = {"type": "demo.noop", **field}
    with pytest.raises(ValidationError) as info:
        TaskRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == next(iter(field))


def test_task_request_accepts_the_limits_themselves() -> None:
    """The documented bounds are inclusive where the contract says so."""
    req = TaskRequest.model_validate(
        {"type": "a" * 128, "priority": 9, "max_attempts": 100, "delay_s": 30 * 24 * 3600}
    )
    assert req.priority == 9 and req.max_attempts == 100


def test_task_request_refuses_unknown_fields() -> None:
    """An unknown field is an error, not silently dropped (a typo must not pass)."""
    with pytest.raises(ValidationError) as info:
        TaskRequest.model_validate({"type": "demo.noop", "priorty": 3})
    (error,) = info.value.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == ("priorty",)


def test_batch_request_bounds() -> None:
    """A batch holds 1..1000 tasks."""
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"tasks": []})
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"tasks": [{"type": "t"}] * 1001})
    assert len(BatchRequest.model_validate({"tasks": [{"type": "t"}] * 1000}).tasks) == 1000


# ---------------------------------------------------------------- TaskMessage


def test_task_message_round_trip() -> None:
    """encode_task_message then parse_task_message gives back the same message."""
    message = TaskMessage(
        task_id=uuid7(), tenant_id=uuid7(), type="demo.sleep", attempt=3, trace_id="ab" * 16
    )
    body = encode_task_message(message)
    assert isinstance(body, bytes)
    assert orjson.loads(body)["v"] == 1
    assert parse_task_message(body) == message


@pytest.mark.parametrize(
    "body",
    [b"not json", b"", b"{", b"\xff\xfe", b"[1, 2]", b'"a string"', b"42", b"null"],
)
def test_parse_refuses_non_json_and_non_objects(body: bytes) -> None:
    """Bodies that are not a JSON object are malformed."""
    with pytest.raises(MalformedMessage) as info:
        parse_task_message(body)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    "overrides",
    [
        {"task_id": "not-a-uuid"},
        {"attempt": 0},
        {"type": ""},
        {"type": "has space"},
        {"extra": "field"},
        {"trace_id": "x" * 65},
    ],
)
def test_parse_refuses_bad_fields(overrides: dict[str, object]) -> None:
    """A v1 object whose fields do not fit the schema is malformed, naming the field."""
    with pytest.raises(MalformedMessage) as info:
        parse_task_message(orjson.dumps(_message_dict(**overrides)))
    assert str(info.value).split(":")[0] == next(iter(overrides))


def test_parse_refuses_a_missing_field() -> None:
    """A v1 object without a required field is malformed."""
    raw = _message_dict()
    del raw["tenant_id"]
    with pytest.raises(MalformedMessage, match="tenant_id"):
        parse_task_message(orjson.dumps(raw))


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_parse_refuses_unknown_versions(version: object) -> None:
    """A schema version this code does not read is UnknownVersion, not malformed."""
    with pytest.raises(UnknownVersion) as info:
        parse_task_message(orjson.dumps(_message_dict(v=version)))
    assert info.value.reason == "unknown_version"
    assert isinstance(info.value, MessageError)


def test_parse_refuses_a_missing_version() -> None:
    """A message without ``v`` is UnknownVersion: we cannot guess its schema."""
    raw = _message_dict()
    del raw["v"]
    with pytest.raises(UnknownVersion):
        parse_task_message(orjson.dumps(raw))


# ---------------------------------------------------------------- ProgressEvent


def test_progress_event_round_trip() -> None:
    """encode_event then parse_event gives back the same event (ts at ms precision)."""
    event = ProgressEvent(
        task_id=uuid7(),
        seq=7,
        state=TaskState.RUNNING,
        progress=0.6,
        message="step 6 of 10",
        data={"rows": [1, 2]},
        attempt=2,
        ts=datetime(2026, 11, 22, 11, 0, 0, 123000, tzinfo=UTC),
    )
    body = encode_event(event)
    assert orjson.loads(body)["ts"] == "2026-11-22T11:00:00.123Z"
    assert parse_event(body) == event
    assert parse_event(body.decode()) == event


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"rows": [1, 2.5, -3e-7, 1e300], "nested": {"ok": True, "none": None}},
        ["é", "日本", "\u2028", 'quote " and \\ backslash'],
        12345678901234567890,
    ],
)
def test_encode_event_writes_what_pydantic_writes(
    data: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encode_event builds the JSON itself (orjson) for speed: byte for byte what the
    model's own serializer writes, so nothing on the wire changes."""
    event = ProgressEvent.model_validate(
        {
            "task_id": uuid7(),
            "seq": 3,
            "state": "running",
            "progress": 0.1,
            "message": "half-way ✓",
            "data": data,
            "attempt": 2,
            "ts": datetime(2026, 11, 22, 11, 0, 0, 123456, tzinfo=UTC),
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
        }
    )
    expected = event.model_dump_json().encode()

    def not_this_way(*args: object, **kwargs: object) -> str:
        raise AssertionError("took pydantic's path")

    monkeypatch.setattr(ProgressEvent, "model_dump_json", not_this_way)
    assert encode_event(event) == expected


@pytest.mark.parametrize(
    "data",
    [
        {"at": datetime(2026, 1, 2, tzinfo=UTC)},  # orjson would write it otherwise
        {1: "an int key"},  # orjson refuses it
        {"tags": {"a"}},  # a set: orjson refuses it
    ],
)
def test_encode_event_leaves_to_pydantic_what_orjson_would_write_otherwise(
    data: object,
) -> None:
    event = ProgressEvent(
        task_id=uuid7(), seq=1, state="running", progress=0, data=data, ts=datetime.now(UTC)
    )
    body = encode_event(event)
    assert body == event.model_dump_json().encode()
    assert parse_event(body).seq == 1


def test_progress_event_ts_is_truncated_to_milliseconds() -> None:
    """Sub-millisecond precision is dropped on the wire, nothing else changes."""
    ts = datetime(2026, 11, 22, 11, 0, 0, 123456, tzinfo=UTC)
    event = ProgressEvent(task_id=uuid7(), seq=1, state="queued", progress=0, ts=ts)
    back = parse_event(encode_event(event))
    assert back.ts == ts.replace(microsecond=123000)
    assert back.model_copy(update={"ts": ts}) == event


@pytest.mark.parametrize(
    "body",
    [b"nope", b"{}", b'{"task_id": "x", "seq": 1}'],
)
def test_parse_event_refuses_garbage(body: bytes) -> None:
    """Anything that is not an event raises MalformedMessage."""
    with pytest.raises(MalformedMessage):
        parse_event(body)


@pytest.mark.parametrize("fields", [{"seq": 0}, {"progress": 1.5}, {"progress": -0.1}])
def test_progress_event_limits(fields: dict[str, object]) -> None:
    """seq starts at 1 and progress stays within 0..1."""
    base: dict[str, object] = {
        "task_id": uuid7(),
        "seq": 1,
        "state": "running",
        "progress": 0.5,
        "ts": datetime.now(UTC),
    }
    with pytest.raises(ValidationError):
        ProgressEvent.model_validate({**base, **fields})


# ---------------------------------------------------------------- format_ts / states


def test_format_ts_shape() -> None:
    """Timestamps are RFC 3339 UTC with milliseconds and a Z, as the contract shows."""
    assert format_ts(datetime(2026, 11, 22, 11, 0, 0, tzinfo=UTC)) == "2026-11-22T11:00:00.000Z"
    assert (
        format_ts(datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=UTC)) == "2026-01-02T03:04:05.999Z"
    )


def test_format_ts_converts_to_utc() -> None:
    """An aware timestamp in another zone is written in UTC."""
    paris = timezone(timedelta(hours=1))
    assert format_ts(datetime(2026, 11, 22, 12, 0, 0, 5000, tzinfo=paris)) == (
        "2026-11-22T11:00:00.005Z"
    )


def test_terminal_states() -> None:
    """succeeded, failed and cancelled are the terminal states, and only they."""
    assert {s for s in TaskState if s.terminal} == {"succeeded", "failed", "cancelled"}


def test_task_message_ids_are_uuids() -> None:
    """The parsed ids are UUID objects, not strings."""
    message = parse_task_message(orjson.dumps(_message_dict()))
    assert isinstance(message.task_id, UUID) and isinstance(message.tenant_id, UUID)
