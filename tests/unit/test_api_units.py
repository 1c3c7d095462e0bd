"""The API's pure parts: the drain estimator behind Retry-After, the admission ledgers
and the refusals they feed, cursors, the Idempotency-Key rule, validation problems, the OpenAPI document, and the key cache's
single lookup per key and the task types' single read (with fake repositories)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock
from uuid import UUID

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from aiormq.exceptions import AMQPConnectionError, DeliveryError
from jsonschema import Draft202012Validator
from pamqp.commands import Basic
from prometheus_client import REGISTRY
from pydantic import BaseModel, ValidationError

from services.api import meaning
from services.api import requests as rq
from services.api.app import _LazyPublisher, dependency_middleware
from services.api.auth import Authenticator
from services.api.backpressure import AdmissionLedger, DrainEstimator, QueueMonitor
from services.api.openapi import build_openapi
from services.api.problems import ProblemException, validation_problem
from services.api.repository import OutcomeUnknown, Principal, committed, reply_lost
from services.api.routes import _admit, _trace_id, routes
from services.api.tasktypes import TaskTypes
from services.api.views import task_document
from shared import keys
from shared.amqp import Outgoing, settled
from shared.digits import decimal_int
from shared.ids import uuid7
from shared.jsonsafe import deeper_than, nul_path
from shared.schemas import BatchRequest, Task, TaskError, TaskLinks, TaskRequest, TaskState
from shared.tasktypes import TaskTypeInfo
from shared.wire import Wire

# ---------------------------------------------------------------- DrainEstimator


def test_rate_starts_at_the_floor() -> None:
    """Before any sample the rate is the floor (a conservative 1 msg/s)."""
    assert DrainEstimator().rate == 1.0


def test_rate_is_measured_from_a_falling_depth() -> None:
    """A depth falling by 100 in 1 s moves the smoothed rate toward 100/s."""
    est = DrainEstimator(smoothing=0.3, floor=1.0)
    est.sample(0.0, 1000)
    est.sample(1.0, 900)
    assert est.rate == pytest.approx(0.3 * 100 + 0.7 * 1.0)
    for i in range(2, 40):
        est.sample(float(i), 1000 - 100 * i)
    assert est.rate == pytest.approx(100, rel=0.01)


def test_rising_or_flat_depth_does_not_change_the_rate() -> None:
    """Only falls are evidence of draining; rises (publishes) say nothing."""
    est = DrainEstimator()
    est.sample(0.0, 100)
    est.sample(1.0, 50)
    rate = est.rate
    est.sample(2.0, 500)
    est.sample(3.0, 500)
    est.sample(3.0, 400)  # no time elapsed: ignored
    assert est.rate == rate


def test_retry_after_is_bounded() -> None:
    """Retry-After is always within 1..60 seconds."""
    est = DrainEstimator()
    assert est.retry_after(depth=0, limit=100) == 1
    assert est.retry_after(depth=100, limit=100) == 1
    assert est.retry_after(depth=10**9, limit=100) == 60
    fast = DrainEstimator()
    fast.sample(0, 10**7)
    fast.sample(1, 0)
    assert fast.retry_after(depth=101, limit=100) == 1


def test_retry_after_grows_with_depth() -> None:
    """The deeper past the limit, the longer the wait, at a given rate."""
    est = DrainEstimator()
    est.sample(0.0, 1000)
    est.sample(1.0, 990)  # rate 3.7/s
    values = [est.retry_after(depth=d, limit=100) for d in range(100, 400, 5)]
    assert values == sorted(values)
    assert values[0] < values[-1]
    assert est.retry_after(150, 100) == math.ceil(51 / est.rate)


# ---------------------------------------------------------------- AdmissionLedger


def test_an_admission_counts_until_a_sample_begun_after_its_commit() -> None:
    """Pending while its transaction runs, then counted until a sample that started
    after the commit: however long the relay takes, a sample before that misses it."""
    ledger = AdmissionLedger()
    ledger.begin(3)
    assert ledger.unseen == 3
    ledger.seen_by(10.0)  # a sample during the transaction: the rows may not exist yet
    assert ledger.unseen == 3
    ledger.end(3, committed_at=10.5)
    ledger.seen_by(10.4)  # started before the commit
    assert ledger.unseen == 3
    ledger.seen_by(10.6)
    assert ledger.unseen == 0


def test_an_admission_that_did_not_commit_stops_counting_at_once() -> None:
    ledger = AdmissionLedger()
    ledger.begin(1)
    ledger.begin(2)
    ledger.end(2, committed_at=None)
    assert ledger.unseen == 1
    ledger.end(1, committed_at=5.0)
    ledger.seen_by(4.0)
    assert ledger.unseen == 1


def test_a_sample_forgets_only_the_commits_before_it() -> None:
    ledger = AdmissionLedger()
    for at in (1.0, 2.0, 3.0):
        ledger.begin(10)
        ledger.end(10, committed_at=at)
    ledger.seen_by(2.5)
    assert ledger.unseen == 10


def test_an_admission_of_nothing_leaves_no_entry() -> None:
    """The delayed ledger sees every submission, most of them with no delayed task:
    those add nothing for a sample to forget."""
    ledger = AdmissionLedger()
    ledger.begin(0)
    ledger.end(0, committed_at=1.0)
    assert ledger.unseen == 0 and not ledger._committed


def _monitor(delayed_limit: int = 3, depth_limit: int = 100) -> QueueMonitor:
    """A monitor that never samples (no broker, no pool), its sample just taken."""
    monitor = QueueMonitor(
        cast(Any, None),
        cast(Any, None),
        Wire("unit"),
        limit=depth_limit,
        delayed_limit=delayed_limit,
        interval_s=0.25,
        timeout=1.0,
    )
    monitor.sampled_at = time.monotonic()
    return monitor


def _services(monitor: QueueMonitor) -> Any:
    settings = SimpleNamespace(
        max_queue_depth=monitor._limit, max_delayed_tasks=monitor._delayed_limit
    )
    return SimpleNamespace(monitor=monitor, settings=settings, relay=None)


def test_delayed_admissions_count_in_both_ledgers_until_their_samples() -> None:
    """A delayed task counts against the queue's limit until a depth sample, and against
    the delayed limit until a count of the rows not yet due, each begun after the commit."""
    monitor = _monitor()
    with monitor.admitting(3, delayed=2):
        assert (monitor.estimated_depth, monitor.estimated_delayed) == (3, 2)
    committed = time.monotonic()
    monitor.ledger.seen_by(committed + 1)
    assert (monitor.estimated_depth, monitor.estimated_delayed) == (0, 2)
    monitor.delayed = 2  # the count that saw them
    monitor.delayed_ledger.seen_by(committed + 1)
    assert monitor.estimated_delayed == 2


def test_a_failed_delayed_admission_stops_counting_at_once() -> None:
    monitor = _monitor()
    with pytest.raises(RuntimeError), monitor.admitting(1, delayed=1):
        raise RuntimeError("the insert failed")
    assert (monitor.estimated_depth, monitor.estimated_delayed) == (0, 0)


def _refusal(svc: Any, count: int, delayed: int) -> ProblemException | None:
    try:
        with _admit(svc, count, delayed):
            pass
    except ProblemException as exc:
        return exc
    return None


def test_delayed_tasks_are_refused_past_their_limit_and_others_are_not() -> None:
    """With 3 allowed: the stored ones and those admitted since the last count fill it,
    the next delayed task gets a 503 delayed-full with Retry-After, a task without a
    delay is still admitted, and a batch that would cross the limit is refused whole."""
    monitor = _monitor(delayed_limit=3)
    svc = _services(monitor)
    monitor.delayed = 1
    assert _refusal(svc, 1, 1) is None  # 2 of 3, the second not counted by a sample yet
    assert _refusal(svc, 3, 2) is not None  # whole: 2 + 2 > 3
    assert monitor.estimated_delayed == 2
    assert _refusal(svc, 2, 1) is None  # 3 of 3
    refused = _refusal(svc, 1, 1)
    assert refused is not None
    problem = refused.problem
    assert problem.status == 503 and problem.type.endswith("/delayed-full"), problem
    assert refused.headers["Retry-After"].isdigit() and int(refused.headers["Retry-After"]) > 0
    assert _refusal(svc, 1, 0) is None
    assert _refusal(svc, 5, 0) is None
    # Refusals admitted nothing; the tasks without a delay count only against the queue.
    assert (monitor.estimated_depth, monitor.estimated_delayed) == (3 + 6, 3)


def test_the_queue_limit_still_holds_for_delayed_tasks() -> None:
    """The delayed limit adds to the queue's: a full queue refuses delayed tasks too."""
    monitor = _monitor(delayed_limit=100, depth_limit=2)
    monitor.depth = 2
    refused = _refusal(_services(monitor), 1, 1)
    assert refused is not None and refused.problem.type.endswith("/queue-full")


@pytest.mark.parametrize(
    ("count", "delayed", "setting"),
    [(60, 0, "LONGHAUL_MAX_QUEUE_DEPTH"), (4, 4, "LONGHAUL_MAX_DELAYED_TASKS")],
)
def test_a_batch_larger_than_a_limit_is_a_422_not_a_503_to_retry(
    count: int, delayed: int, setting: str
) -> None:
    """Over the limit however empty the queue: no Retry-After could ever be true, so a
    422 at the batch's tasks naming the limit (and it wins over a broker outage)."""
    monitor = _monitor(delayed_limit=3, depth_limit=10)
    svc = _services(monitor)
    for fresh in (True, False):
        monitor.sampled_at = time.monotonic() if fresh else -1e9
        refused = _refusal(svc, count, delayed)
        assert refused is not None
        problem = refused.problem
        assert problem.status == 422 and problem.type.endswith("/batch-too-large"), problem
        assert "Retry-After" not in refused.headers
        assert problem.errors is not None and problem.errors[0].loc == ["body", "tasks"]
        assert setting in problem.errors[0].msg and setting in (problem.detail or "")
    assert (monitor.estimated_depth, monitor.estimated_delayed) == (0, 0)


def test_a_batch_that_fits_the_limit_but_not_the_room_left_stays_a_503() -> None:
    monitor = _monitor(delayed_limit=3, depth_limit=10)
    svc = _services(monitor)
    assert _refusal(svc, 10, 3) is None  # exactly the limits, on an empty queue
    for count, delayed, slug in ((1, 0, "queue-full"), (0, 1, "delayed-full")):
        refused = _refusal(svc, count, delayed)
        assert refused is not None and refused.problem.status == 503
        assert refused.problem.type.endswith(slug) and "Retry-After" in refused.headers


@pytest.mark.parametrize(
    ("query", "filters"),
    [
        ("state=failed&state=cancelled", True),
        ("state=failed&state=failed", True),
        ("type=a.b&type=c.d", True),
        ("limit=5&limit=500", True),
        ("limit=5&limit=5&cursor=", False),
        ("cursor=&cursor=AAAAAAAAAAAAAAAAAAAAAA", False),
    ],
)
def test_a_repeated_list_parameter_is_a_422_not_its_first_value(query: str, filters: bool) -> None:
    """Each parameter takes one value: a second is refused, never silently dropped."""
    name = query.split("=", 1)[0]
    with pytest.raises(ProblemException) as info:
        rq.list_query(make_mocked_request("GET", f"/v1/tasks?{query}"), filters=filters)
    problem = info.value.problem
    assert problem.status == 422
    assert [(e.loc, e.msg) for e in problem.errors or []] == [
        (["query", name], "given more than once; it takes one value")
    ]
    assert problem.detail == f"query.{name}: given more than once; it takes one value"


def test_list_parameters_given_once_are_read() -> None:
    request = make_mocked_request("GET", "/v1/tasks?state=failed&type=a.b&limit=7")
    q = rq.list_query(request)
    assert (q.state, q.type, q.limit, q.before) == (TaskState.FAILED, "a.b", 7, None)


# ---------------------------------------------------------------- cursors


def test_cursor_round_trip() -> None:
    """decode_cursor(encode_cursor(id)) is the id, and the cursor is URL-safe."""
    for _ in range(50):
        value = uuid7()
        cursor = rq.encode_cursor(value)
        assert cursor.isascii() and not set(cursor) & set("+/=")
        assert rq.decode_cursor(cursor) == value


@pytest.mark.parametrize("garbage", ["", "!!!", "abc", "é", "a" * 40, "x" * 23, "%%%%"])
def test_garbage_cursor_is_none(garbage: str) -> None:
    """A cursor we did not issue decodes to None, never raises."""
    assert rq.decode_cursor(garbage) is None


# ---------------------------------------------------------------- integer query parameters


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", 1), ("50", 50), ("500", 500), ("0007", 7), ("0" * 30 + "9", 9)]
)
def test_limit_takes_ascii_decimal_digits(raw: str, expected: int) -> None:
    """A limit of ASCII digits alone, leading zeros included, is that number."""
    request = make_mocked_request("GET", f"/v1/tasks?limit={raw}")
    assert rq.list_query(request).limit == expected
    assert decimal_int(raw, 1, 500) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "1_0",
        "+5",
        "%2B5",
        "-5",
        "%205",
        "5%20",
        "5%0A",
        "%D9%A3",
        "%EF%BC%95",
        "0x10",
        "5.0",
        "1e2",
        "",
        "0",
        "501",
        "9" * 4000,
    ],
)
def test_limit_refuses_what_is_not_ascii_decimal_digits(raw: str) -> None:
    """What int() takes but the contract does not ("1_0", " 5", "+5", Arabic-Indic or
    fullwidth digits) is a 422 naming the parameter, as is a number out of range."""
    request = make_mocked_request("GET", f"/v1/tasks?limit={raw}")
    with pytest.raises(ProblemException) as info:
        rq.list_query(request)
    assert info.value.problem.status == 422
    assert [e.loc for e in info.value.problem.errors or []] == [["query", "limit"]]


# ---------------------------------------------------------------- traceparent

_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
_PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "header",
    [
        f"00-{_TRACE}-{_PARENT}-01",
        f"00-{_TRACE}-{_PARENT}-00",
        f"01-{_TRACE}-{_PARENT}-01",  # a later version is read as far as we know it
        f"cc-{_TRACE}-{_PARENT}-01-what-comes-later",
    ],
)
def test_a_valid_traceparent_gives_its_trace_id(header: str) -> None:
    """A well-formed traceparent's trace id is carried on."""
    assert rq.trace_id(header) == _TRACE


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"00-{'z' * 32}-{_PARENT}-01",  # not hex, right length: was propagated
        f"00-{'-' * 32}-{_PARENT}-01",
        f"00-{_TRACE.upper()}-{_PARENT}-01",
        f"00-{_TRACE}-{_PARENT.upper()}-01",
        f"00-{_TRACE}-{'g' * 16}-01",
        f"00-{_TRACE}-{_PARENT}-zz",
        f"00-{_TRACE}-{_PARENT}-1",
        f"0-{_TRACE}-{_PARENT}-01",
        f"xy-{_TRACE}-{_PARENT}-01",
        f"ff-{_TRACE}-{_PARENT}-01",  # version ff is invalid
        f"00-{'0' * 32}-{_PARENT}-01",
        f"00-{_TRACE}-{'0' * 16}-01",
        f"00-{_TRACE}-{_PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{_TRACE}-{_PARENT}-01 ",
        f"00-{_TRACE}0-{_PARENT}-01",
        f"00-{_TRACE}-{_PARENT}0-01",
        f"cc-{_TRACE}-{_PARENT}-01x",
    ],
)
def test_an_invalid_traceparent_is_ignored(header: str) -> None:
    """A traceparent that is not lowercase hex of the right lengths, or names the
    all-zero trace or parent, is treated as absent: the request starts a new trace."""
    assert rq.trace_id(header) is None
    request = make_mocked_request("POST", "/v1/tasks", headers={"traceparent": header})
    started = _trace_id(request)
    assert re.fullmatch("[0-9a-f]{32}", started) and started not in header


def test_no_traceparent_starts_a_trace() -> None:
    """Without the header a request gets a new trace id of its own."""
    assert rq.trace_id(None) is None
    first = _trace_id(make_mocked_request("POST", "/v1/tasks"))
    assert re.fullmatch("[0-9a-f]{32}", first)
    assert _trace_id(make_mocked_request("POST", "/v1/tasks")) != first


# ---------------------------------------------------------------- Idempotency-Key


def _request(headers: dict[str, str]) -> Any:
    return make_mocked_request("POST", "/v1/tasks", headers=headers)


def test_no_idempotency_key_is_none() -> None:
    """Without the header there is no key."""
    assert rq.idempotency_key(_request({})) is None


@pytest.mark.parametrize(
    "key", ["a", "order-42:retry#1", "~" * 255, "!", "order 42", '"sf string"']
)
def test_valid_idempotency_keys(key: str) -> None:
    """1..255 printable ASCII characters are accepted as they are."""
    assert rq.idempotency_key(_request({"Idempotency-Key": key})) == key


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "del\x7f", "caf\u00e9"])
def test_invalid_idempotency_keys(key: str) -> None:
    """Empty, too long, controls or non-ASCII keys are a 422 naming the header."""
    with pytest.raises(ProblemException) as info:
        rq.idempotency_key(_request({"Idempotency-Key": key}))
    problem = info.value.problem
    assert problem.status == 422
    assert problem.errors is not None
    assert problem.errors[0].loc == ["header", "Idempotency-Key"]


def _typed(body: dict[str, Any], schema: dict[str, Any] | None = None) -> rq.Typed:
    return rq.Typed(TaskRequest.model_validate(body), schema or {})


def test_request_hash_ignores_key_order_and_spelled_defaults() -> None:
    """Two bodies with the same meaning have the same fingerprint; others differ."""
    a = _typed({"type": "t", "args": {"x": 1, "y": 2}})
    b = _typed({"args": {"y": 2, "x": 1}, "type": "t", "priority": 0})
    c = _typed({"type": "t", "args": {"x": 1, "y": 3}})
    assert rq.request_hash(a) == rq.request_hash(b)
    assert rq.request_hash(a) != rq.request_hash(c)


def _sent_and_typed(body: dict[str, Any]) -> tuple[TaskRequest, rq.Typed]:
    """A request as sent, and as it will run for a type whose own max_attempts is 3."""
    info = TaskTypeInfo("x.t", {"type": "object"}, Draft202012Validator({}), max_attempts=3)
    sent = TaskRequest.model_validate(body)
    return sent, rq.Typed(info.defaults_for(sent), info.args_schema)


def test_the_fingerprint_is_of_the_request_with_its_types_defaults() -> None:
    """With T's own default of 3 attempts, {"type": T} is the request that sets 3, and
    not the one that sets the contract's 5 (which matched it, hashed as sent)."""
    bare, bare_typed = _sent_and_typed({"type": "x.t"})
    three, three_typed = _sent_and_typed({"type": "x.t", "max_attempts": 3})
    five, five_typed = _sent_and_typed({"type": "x.t", "max_attempts": 5})
    stored = rq.request_hash(bare_typed)
    assert len(stored) == 33 and stored[:1] == b"\x03"  # a version byte, then sha256
    assert rq.same_request(stored, bare, bare_typed)
    assert rq.same_request(stored, three, three_typed)
    assert not rq.same_request(stored, five, five_typed)
    assert not rq.same_request(rq.request_hash(five_typed), bare, bare_typed)


def test_a_fingerprint_stored_before_the_version_byte_compares_as_it_was_made() -> None:
    """A row written before the upgrade holds a bare sha256 of the request as sent: the
    client retrying that request still matches it, and another body does not."""
    bare, bare_typed = _sent_and_typed({"type": "x.t"})
    old = hashlib.sha256(
        orjson.dumps(bare.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    ).digest()
    assert rq.legacy_request_hash(bare) == old
    assert rq.same_request(old, bare, bare_typed)
    other, other_typed = _sent_and_typed({"type": "x.t", "priority": 1})
    assert not rq.same_request(old, other, other_typed)
    assert not rq.same_request(b"", bare, bare_typed)  # a row with no fingerprint


# demo.sleep's args schema, as its worker registers it.
_SLEEP_SCHEMA: dict[str, Any] = {
    "additionalProperties": False,
    "properties": {
        "seconds": {"default": 5.0, "maximum": 86400, "minimum": 0, "type": "number"},
        "steps": {"default": 10, "maximum": 100000, "minimum": 1, "type": "integer"},
    },
    "type": "object",
}


def _sleep(args: dict[str, Any]) -> rq.Typed:
    return _typed({"type": "demo.sleep", "args": args}, _SLEEP_SCHEMA)


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ({"seconds": 1.0, "steps": 1}, {"seconds": 1, "steps": 1}),
        ({"seconds": 1, "steps": 1.0}, {"seconds": 1.0, "steps": 1}),
        ({"seconds": 2.5}, {"seconds": 2.50, "steps": 10}),
        ({}, {"seconds": 5, "steps": 10}),
        ({}, {"seconds": 5.0}),
        ({"steps": 10}, {"seconds": 5}),
    ],
)
def test_args_that_run_the_same_repeat_under_an_idempotency_key(
    first: dict[str, Any], again: dict[str, Any]
) -> None:
    """Numbers compare by value (1.0 is 1) and an arg left out is its schema's default:
    the handler gets the same args either way."""
    stored = rq.request_hash(_sleep(first))
    sent = _sleep(again)
    assert rq.same_request(stored, sent.request, sent)
    batch = rq.batch_hash([_sleep(first), _sleep({})])
    assert rq.same_batch(batch, [sent, _sleep({"steps": 10})])


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ({}, {"seconds": 1}),
        ({"seconds": 1.5}, {"seconds": 1}),
        ({"steps": 1}, {"steps": 2}),
    ],
)
def test_args_that_run_otherwise_are_another_request(
    first: dict[str, Any], again: dict[str, Any]
) -> None:
    stored = rq.request_hash(_sleep(first))
    sent = _sleep(again)
    assert not rq.same_request(stored, sent.request, sent)
    assert not rq.same_batch(rq.batch_hash([_sleep(first)]), [sent])


def test_fingerprints_of_version_1_compare_args_as_they_were_sent() -> None:
    """A row stored by the previous version (args hashed as sent) still matches the
    very request it stored, single or batch, and the spelled-out default does not."""
    sent = _sleep({"seconds": 1.0})
    spelled = _sleep({"seconds": 1.0, "steps": 10})
    single_v1 = rq.request_hash_v1(sent.request)
    assert single_v1[:1] == b"\x01"
    assert rq.same_request(single_v1, sent.request, sent)
    assert not rq.same_request(single_v1, spelled.request, spelled)
    batch_v1 = rq.batch_hash_v1([sent.request])
    assert batch_v1[:1] == b"\x02"
    assert rq.same_batch(batch_v1, [sent])
    assert not rq.same_batch(batch_v1, [spelled])
    # A single request never matches a batch's fingerprint, of either version.
    assert not rq.same_request(batch_v1, sent.request, sent)
    assert not rq.same_request(rq.batch_hash([sent]), sent.request, sent)
    assert not rq.same_batch(single_v1, [sent])
    assert not rq.same_batch(rq.request_hash(sent), [sent])


class _Window(BaseModel):
    months: int = 12
    label: str | None = None


class _ReportArgs(BaseModel):
    customer_id: int
    window: _Window = _Window()
    extra: _Window | None = None
    windows: list[_Window] = []
    named: dict[str, _Window] = {}
    either: _Window | _ReportArgs | None = None


def test_args_get_the_defaults_of_nested_models_as_their_handler_would() -> None:
    """A pydantic model's schema ($defs, $ref, Model | None, lists and dicts of models):
    the defaults its validation would give are filled in, at any depth; where a value
    could follow either of two models, it is left as sent."""
    schema = _ReportArgs.model_json_schema()
    args = {
        "customer_id": 7,
        "extra": {"label": "x"},
        "windows": [{}, {"months": 3}],
        "named": {"q": {}},
        "either": {},
    }
    assert meaning.with_defaults(schema, args) == {
        "customer_id": 7,
        "window": {"months": 12, "label": None},
        "extra": {"months": 12, "label": "x"},
        "windows": [{"months": 12, "label": None}, {"months": 3, "label": None}],
        "named": {"q": {"months": 12, "label": None}},
        "either": {},
    }
    assert args["windows"] == [{}, {"months": 3}]  # not changed in place
    handler_args = _ReportArgs.model_validate(args).model_dump(mode="json")
    filled = meaning.with_defaults(schema, args)
    assert handler_args == {**filled, "either": handler_args["either"]}


def test_a_schema_that_says_nothing_usable_leaves_args_as_sent() -> None:
    looping = {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}}
    for schema in ({}, {"type": "object"}, {"$ref": "#/$defs/A", **looping}, {"$ref": "x#/y"}):
        assert meaning.with_defaults(schema, {"a": 1}) == {"a": 1}
    # A default that holds its own model is taken as is, not walked.
    holds_itself = {"properties": {"a": {"$ref": "#", "default": {}}}}
    assert meaning.with_defaults(holds_itself, {}) == {"a": {}}


def test_numbers_compare_by_value() -> None:
    assert meaning.by_value({"a": [1.0, -0.0, 2.5, True, None, "1.0"]}) == {
        "a": [1, 0, 2.5, True, None, "1.0"]
    }
    assert isinstance(meaning.by_value(1.0), int)
    assert meaning.by_value(True) is True
    # Past what orjson reads as an int, a float stays a float (as the client's int would).
    assert meaning.by_value(2.0**64) == 2.0**64 and isinstance(meaning.by_value(2.0**64), float)
    assert meaning.by_value(1e300) == 1e300
    assert orjson.loads(b"18446744073709551616") == meaning.by_value(2.0**64)


def test_a_batch_stores_its_tasks_under_the_key_then_keys_no_client_can_send() -> None:
    keys = rq.batch_keys("order-7", 3)
    assert keys == ["order-7", "order-7\n1", "order-7\n2"]
    assert rq.batch_keys("k", 1) == ["k"]
    for derived in keys[1:]:
        with pytest.raises(ProblemException):
            rq.idempotency_key(_request({"Idempotency-Key": derived}))


def test_a_batchs_fingerprint_is_of_its_items_in_order_and_never_a_single_requests() -> None:
    a = _typed({"type": "t", "args": {"x": 1}})
    a_spelled = _typed({"args": {"x": 1}, "type": "t", "priority": 0})
    b = _typed({"type": "t", "args": {"x": 2}})
    assert rq.batch_hash([a, b]) == rq.batch_hash([a_spelled, b])
    assert rq.batch_hash([a, b]) != rq.batch_hash([b, a])
    assert rq.batch_hash([a, b]) != rq.batch_hash([a, b, b])
    one = rq.batch_hash([a])
    assert one[:1] == b"\x04" and len(one) == 33
    assert not rq.same_request(one, a.request, a)  # a single request meeting a batch's key


def _stored(key: str, fingerprint: bytes, n: int) -> dict[str, Any]:
    return {"idempotency_key": key, "request_hash": fingerprint, "n": n}


def test_a_batch_is_replayed_in_request_order_only_whole_and_only_if_the_same() -> None:
    keys = rq.batch_keys("k", 3)
    same, other = b"\x04" + b"s" * 32, b"\x04" + b"o" * 32
    found = [_stored(keys[2], same, 2), _stored(keys[0], same, 0), _stored(keys[1], same, 1)]
    assert [r["n"] for r in rq.batch_replayed(found, keys, same.__eq__)] == [0, 1, 2]

    with pytest.raises(ProblemException) as info:
        rq.batch_replayed(found, keys, other.__eq__)  # another batch under the key
    assert info.value.problem.status == 422
    assert info.value.problem.errors is not None
    assert info.value.problem.errors[0].loc == ["header", "Idempotency-Key"]

    single = b"\x03" + b"s" * 32  # a single request took the key first
    with pytest.raises(ProblemException) as info:
        rq.batch_replayed([_stored("k", single, 0)], keys, same.__eq__)
    assert info.value.problem.status == 422

    with pytest.raises(ProblemException) as info:  # one task deleted after retention
        rq.batch_replayed(found[:2], keys, same.__eq__)
    assert info.value.problem.status == 409
    assert "1 of the 3" in (info.value.problem.detail or "")


# ---------------------------------------------------------------- problems


def _validation_error(body: dict[str, Any]) -> ValidationError:
    try:
        TaskRequest.model_validate(body)
    except ValidationError as exc:
        return exc
    raise AssertionError("expected a validation error")


def test_validation_problem_shape() -> None:
    """A validation error becomes a 422 problem with errors located under body."""
    exc = validation_problem(_validation_error({"type": "", "bogus": 1}))
    problem = exc.problem
    assert problem.status == 422
    assert problem.type.endswith("/validation")
    assert problem.title == "Invalid request"
    assert problem.errors is not None
    locs = {tuple(e.loc) for e in problem.errors}
    assert locs == {("body", "type"), ("body", "bogus")}
    assert problem.detail is not None and "body.type" in problem.detail
    dumped = problem.model_dump(exclude_none=True)
    assert set(dumped) == {"type", "title", "status", "detail", "errors"}
    assert all(set(e) == {"loc", "msg"} for e in dumped["errors"])


def test_validation_problem_prefix_and_more() -> None:
    """The prefix is prepended to every loc, and the detail counts errors beyond 3."""
    err = _validation_error(
        {"type": "", "priority": 99, "max_attempts": 0, "timeout_s": -1, "delay_s": -1}
    )
    problem = validation_problem(err, prefix=("body", "tasks", 3)).problem
    assert problem.errors is not None and len(problem.errors) == 5
    assert all(e.loc[:3] == ["body", "tasks", 3] for e in problem.errors)
    assert problem.detail is not None and problem.detail.endswith("(and 2 more)")


async def _body_request(body: bytes) -> web.Request:
    payload = StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    headers = {"Content-Type": "application/json"}
    return make_mocked_request("POST", "/v1/tasks", headers=headers, payload=payload)


@pytest.mark.parametrize("body", [b'{"type": "demo.fail", "args": {"message": "\xff"}}', b"\xc3("])
async def test_a_body_that_is_not_utf8_is_told_so(body: bytes) -> None:
    """Not orjson's "surrogates not allowed": the client sent no surrogate."""
    with pytest.raises(ProblemException) as info:
        await rq.read_json(await _body_request(body))
    problem = info.value.problem
    assert problem.status == 400 and problem.type.endswith("/invalid-json")
    assert problem.detail is not None and "not valid UTF-8" in problem.detail, problem
    assert "surrogate" not in problem.detail


async def test_a_body_that_is_not_json_still_says_why() -> None:
    with pytest.raises(ProblemException) as info:
        await rq.read_json(await _body_request(b"{not json"))
    assert (info.value.problem.detail or "").startswith("the body is not valid JSON: ")


@pytest.mark.parametrize("body", [[], None, "demo.noop", 3])
def test_a_body_that_is_not_an_object_is_told_so_without_our_class_names(body: Any) -> None:
    for model in (TaskRequest, BatchRequest):
        with pytest.raises(ProblemException) as info:
            rq.validate(model, body)
        problem = info.value.problem
        assert problem.status == 422
        assert [(e.loc, e.msg) for e in problem.errors or []] == [
            (["body"], "the body must be a JSON object")
        ]
        assert problem.detail == "the body must be a JSON object"


def test_items_and_fields_of_the_wrong_kind_name_the_json_kind() -> None:
    with pytest.raises(ProblemException) as info:
        rq.validate(BatchRequest, {"tasks": [None, {"type": "a", "backoff": [], "args": []}]})
    found = [(e.loc, e.msg) for e in info.value.problem.errors or []]
    assert found == [
        (["body", "tasks", 0], "must be a JSON object"),
        (["body", "tasks", 1, "args"], "must be a JSON object"),
        (["body", "tasks", 1, "backoff"], "must be a JSON object"),
    ]
    with pytest.raises(ProblemException) as info:
        rq.validate(BatchRequest, {"tasks": {}})
    assert [e.msg for e in info.value.problem.errors or []] == ["must be a JSON array"]
    assert "Request" not in orjson.dumps(info.value.problem.model_dump()).decode()


def test_a_missing_required_arg_is_located_at_the_arg() -> None:
    schema = {
        "type": "object",
        "required": ["a", "b"],
        "properties": {"inner": {"type": "object", "required": ["c"]}},
    }
    info = TaskTypeInfo("x.t", schema, Draft202012Validator(schema))
    errors = info.errors({"b": 1, "inner": {}}, ["body", "args"])
    assert [(e.loc, e.msg) for e in errors] == [
        (["body", "args", "a"], "Field required"),
        (["body", "args", "inner", "c"], "Field required"),
    ]
    # Other errors stay where jsonschema puts them.
    [bad] = info.errors({"a": 1, "b": 1, "inner": 3}, ["body", "args"])
    assert bad.loc == ["body", "args", "inner"] and "object" in bad.msg


# ---------------------------------------------------------------- OpenAPI


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_lists_every_v1_route() -> None:
    """Every /v1 route the app serves is in the document, with its method."""
    doc = build_openapi("http://127.0.0.1:8000")
    assert doc["openapi"].startswith("3.1")
    served = {
        (route.path, route.method.lower())  # type: ignore[attr-defined]
        for route in routes
        if route.path.startswith("/v1/")  # type: ignore[attr-defined]
    }
    assert served, "no /v1 routes found"
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served <= documented, served - documented
    assert documented <= served, documented - served


def test_openapi_refs_resolve() -> None:
    """Every $ref points at an entry of components.schemas."""
    doc = build_openapi("http://127.0.0.1:8000")
    schemas = doc["components"]["schemas"]
    refs = _refs(doc)
    assert refs
    prefix = "#/components/schemas/"
    for ref in refs:
        assert ref.startswith(prefix), ref
        assert ref.removeprefix(prefix) in schemas, ref


def test_openapi_operations_are_well_formed() -> None:
    """Each operation has a unique operationId and responses with descriptions."""
    doc = build_openapi("http://example.test")
    assert doc["servers"] == [{"url": "http://example.test"}]
    ids = []
    for ops in doc["paths"].values():
        for op in ops.values():
            ids.append(op["operationId"])
            assert op["responses"]
            assert all("description" in r for r in op["responses"].values())
            for param in op.get("parameters", []):
                assert {"name", "in", "schema"} <= set(param)
                if param["in"] == "path":
                    assert param["required"] is True
    assert len(ids) == len(set(ids))


def test_openapi_task_schema_has_contract_fields() -> None:
    """The Task schema names the contract's fields."""
    task = build_openapi("http://x")["components"]["schemas"]["Task"]
    for field in ("id", "type", "state", "progress", "attempts", "last_seq", "links"):
        assert field in task["properties"], field


def test_path_id_parsing() -> None:
    """A malformed path id is a 404, a UUID is returned as one."""
    value = uuid7()
    ok = make_mocked_request("GET", f"/v1/tasks/{value}", match_info={"id": str(value)})
    assert rq.path_id(ok) == value
    bad = make_mocked_request("GET", "/v1/tasks/nope", match_info={"id": "nope"})
    with pytest.raises(ProblemException) as info:
        rq.path_id(bad)
    assert info.value.problem.status == 404
    assert isinstance(value, UUID)


def test_deeper_than_counts_arrays_and_objects_without_recursing() -> None:
    deep: Any = 1
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    assert deeper_than(deep, 64)
    assert not deeper_than({"a": [{"b": [1]}]}, 4)
    assert deeper_than({"a": [{"b": [1]}]}, 3)
    assert not deeper_than("scalar", 0)


def test_nul_path_finds_nul_in_strings_keys_and_lists() -> None:
    """A NUL anywhere PostgreSQL would store it is found, with its location."""
    assert nul_path({"a": ["x", "y\x00"]}, ["body"]) == ["body", "a", 1]
    assert nul_path({"k\x00": 1}, ["body"]) == ["body"]
    assert nul_path({"a": "\\u0000 is text here"}, ["body"]) is None


# ---------------------------------------------------------------- Authenticator


class _SlowKeys:
    """A key store whose lookups wait for the test, counting them."""

    def __init__(self, secret_hash: bytes) -> None:
        self.secret_hash = secret_hash
        self.lookups = 0
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def api_key(self, key_id: str) -> tuple[bytes, Principal]:
        self.lookups += 1
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return self.secret_hash, Principal(UUID(int=7), key_id, None, None)


def _authenticate(auth: Authenticator, key: str) -> Any:
    return auth.authenticate(
        make_mocked_request("POST", "/v1/tasks", headers={"Authorization": f"Bearer {key}"})
    )


async def test_requests_that_miss_together_share_one_key_lookup() -> None:
    """When a key's cache entry is missing (or expired), the requests in flight share one
    lookup; one of them going away cancels nobody else's."""
    new = keys.generate("test")
    store = _SlowKeys(new.secret_hash)
    auth = Authenticator(store, cache_s=60)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(_authenticate(auth, new.key)) for _ in range(20)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()
    store.release.set()
    principals = await asyncio.gather(*waiting[1:])
    assert store.lookups == 1
    assert {p.tenant_id for p in principals} == {UUID(int=7)}
    await _authenticate(auth, new.key)  # cached now
    assert store.lookups == 1


class _OneKey:
    def __init__(self, key_id: str, secret_hash: bytes) -> None:
        self.key_id, self.secret_hash = key_id, secret_hash
        self.lookups: list[str] = []

    async def api_key(self, key_id: str) -> tuple[bytes, Principal] | None:
        self.lookups.append(key_id)
        if key_id != self.key_id:
            return None
        return self.secret_hash, Principal(UUID(int=7), key_id, None, None)


async def test_a_spray_of_unknown_keys_does_not_evict_the_keys_in_use() -> None:
    real = keys.generate("test")
    store = _OneKey(keys.parse(real.key).key_id, real.secret_hash)  # type: ignore[union-attr]
    auth = Authenticator(store, cache_s=60, max_entries=100)  # type: ignore[arg-type]
    await _authenticate(auth, real.key)
    for _ in range(250):  # past max_entries twice over
        with pytest.raises(ProblemException):
            await _authenticate(auth, keys.generate("test").key)
    await _authenticate(auth, real.key)
    assert store.lookups.count(store.key_id) == 1  # still cached
    assert len(store.lookups) == 251


async def test_a_failed_key_lookup_fails_its_waiters_and_is_not_cached() -> None:
    new = keys.generate("test")
    store = _SlowKeys(new.secret_hash)
    store.fail = ConnectionError("database away")
    auth = Authenticator(store, cache_s=60)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(_authenticate(auth, new.key)) for _ in range(3)]
    await asyncio.sleep(0.01)
    store.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    store.fail = None
    assert (await _authenticate(auth, new.key)).tenant_id == UUID(int=7)
    assert store.lookups == 2


class _SlowTypes:
    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()

    async def task_types(self) -> list[dict[str, Any]]:
        self.reads += 1
        await self.release.wait()
        return [
            {
                "name": "demo.noop",
                "args_schema": {"type": "object"},
                "max_attempts": None,
                "timeout_s": None,
                "seen_at": None,
            }
        ]


async def test_requests_that_find_the_task_types_stale_share_one_read() -> None:
    store = _SlowTypes()
    types = TaskTypes(store, refresh_s=60)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(types.get("demo.noop")) for _ in range(20)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()
    store.release.set()
    found = await asyncio.gather(*waiting[1:])
    assert store.reads == 1
    assert {info.name for info in found if info is not None} == {"demo.noop"}
    assert all(info is not None for info in found)


class _Types:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def task_types(self) -> list[dict[str, Any]]:
        return self.rows


async def test_a_type_with_an_invalid_args_schema_is_refused_not_admitted_unchecked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def row(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "args_schema": schema,
            "max_attempts": None,
            "timeout_s": None,
            "seen_at": None,
        }

    rows = [
        row("ok.type", {"type": "object"}),
        row("bad.type", {"type": 12}),
        # Registered by a worker of a version that did not check names.
        row("a name/no request can name", {"type": "object"}),
    ]
    types = TaskTypes(_Types(rows), refresh_s=60)  # type: ignore[arg-type]
    assert (await types.get("ok.type")) is not None
    assert (await types.get("bad.type")) is None
    assert any(getattr(r, "type", None) == "bad.type" for r in caplog.records)
    assert [t.name for t in await types.all()] == ["ok.type"]


class _NoChannel:
    """A robust connection while the broker is away: opening a channel fails."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def channel(self, **_: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        AMQPConnectionError("connection closed"),
        ConnectionRefusedError(111, "refused"),
        RuntimeError("Connection closed"),
        TimeoutError(),
    ],
)
async def test_a_publish_without_a_channel_fails_its_batch_without_raising(
    error: BaseException,
) -> None:
    """The relay keeps running through a broker outage: a batch it cannot publish comes
    back as not confirmed (the rows stay for the next flush), not as an exception that
    would end the relay."""
    publisher = _LazyPublisher(_NoChannel(error), Wire("unit"), timeout=1)  # type: ignore[arg-type]
    result = await publisher.publish([Outgoing("a:1", b"{}"), Outgoing("b:1", b"{}")])
    assert result.confirmed == [False, False]
    assert (result.failed, result.refused) == (2, 0)
    assert result.error is not None and "no channel" in result.error


async def test_a_batch_that_timed_out_still_names_what_the_broker_refused() -> None:
    """Refusals (nacks: a full queue) stop admissions; a batch that also timed out must
    say both, with the counts apart."""
    loop = asyncio.get_running_loop()
    acked, nacked, late = (loop.create_future() for _ in range(3))
    acked.set_result(None)
    nacked.set_exception(DeliveryError(None, Basic.Nack(delivery_tag=2)))
    late.cancel()
    result = settled([acked, nacked, late], "no confirm in time")
    assert (result.confirmed, result.refused, result.failed) == ([True, False, False], 1, 1)
    assert result.error is not None
    assert result.error.startswith("no confirm in time; refused: DeliveryError")
    only_refused = settled([acked, nacked], None)
    assert only_refused.error is not None and only_refused.error.startswith("refused: ")
    assert settled([acked], None).error is None


# ---------------------------------------------------------------- task documents


def _row(**changes: Any) -> dict[str, Any]:
    created = datetime(2026, 12, 5, 10, 0, 0, 123456, tzinfo=UTC)
    row: dict[str, Any] = {
        "id": uuid7(),
        "type": "demo.noop",
        "args": {},
        "state": "queued",
        "progress": 0.0,
        "message": None,
        "result": None,
        "error": None,
        "attempts": 0,
        "max_attempts": 3,
        "priority": 0,
        "timeout_s": 600.0,
        "created_at": created,
        "started_at": None,
        "finished_at": None,
        "updated_at": created,
        "next_attempt_at": None,
        "last_seq": 1,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    return {**row, **changes}


def _finished() -> dict[str, Any]:
    later = datetime(2026, 12, 5, 12, 0, 1, 999000, tzinfo=timezone(timedelta(hours=2)))
    return _row(
        state="succeeded",
        progress=1.0,
        message="done ✓",
        args={"n": [1, 2.5], "nested": {"s": "é"}},
        result={"rows": 3, "ok": True},
        attempts=2,
        started_at=later,
        finished_at=later,
        updated_at=later,
        last_seq=4,
    )


@pytest.mark.parametrize(
    "row",
    [
        _row(),
        _finished(),
        # The stored error may hold more than the contract's three fields.
        _row(
            state="failed",
            error={"type": "ValueError", "message": "bad", "retryable": False, "stack": "…"},
        ),
        _row(state="retrying", next_attempt_at=_row()["created_at"]),
    ],
)
def test_a_task_document_is_the_contracts_task_object(row: dict[str, Any]) -> None:
    """task_document builds the Task object from the row without the model, for speed:
    it must be exactly what the model makes of the same row."""

    doc = task_document(row, "ws://example/v1/ws")
    error = row["error"]
    model = Task(
        **{k: v for k, v in row.items() if k != "error"},
        error=TaskError.model_validate(error) if error else None,
        links=TaskLinks(self=f"/v1/tasks/{row['id']}", events="ws://example/v1/ws"),
    )
    assert orjson.dumps(doc) == model.model_dump_json().encode()
    assert Task.model_validate(doc).model_dump(mode="json") == doc  # valid as the contract says


def test_a_types_defaults_fill_only_what_the_request_left_unset() -> None:
    info = TaskTypeInfo(
        "x.t", {"type": "object"}, Draft202012Validator({}), max_attempts=1, timeout_s=0.5
    )
    bare = TaskRequest.model_validate({"type": "x.t"})
    assert (info.defaults_for(bare).max_attempts, info.defaults_for(bare).timeout_s) == (1, 0.5)
    own = TaskRequest.model_validate({"type": "x.t", "max_attempts": 5, "timeout_s": 600})
    assert info.defaults_for(own) == own  # the request's values, even the contract's defaults
    half = TaskRequest.model_validate({"type": "x.t", "timeout_s": 9})
    assert (info.defaults_for(half).max_attempts, info.defaults_for(half).timeout_s) == (1, 9)
    plain = TaskTypeInfo("x.t", {"type": "object"}, Draft202012Validator({}))
    assert plain.defaults_for(bare) == bare


# ---------------------------------------------------------------- dependency errors


async def test_a_value_postgresql_refuses_is_a_422_listing_its_error() -> None:
    """Input that passed validation but that PostgreSQL will not store is the client's
    to fix: a 422 with the contract's ``errors`` list, as every validation failure."""

    async def refusing(request: web.Request) -> web.StreamResponse:
        raise asyncpg.DataError("value out of range")

    request = make_mocked_request("POST", "/v1/tasks")
    with pytest.raises(ProblemException) as info:
        await dependency_middleware(request, refusing)
    problem = info.value.problem
    assert problem.status == 422
    assert [(e.loc, e.msg) for e in problem.errors or []] == [
        (["body"], "a value cannot be stored: value out of range")
    ]


async def test_postgresql_unreachable_is_a_503_with_retry_after() -> None:
    async def unreachable(request: web.Request) -> web.StreamResponse:
        raise ConnectionRefusedError("no PostgreSQL")

    with pytest.raises(ProblemException) as info:
        await dependency_middleware(make_mocked_request("GET", "/v1/tasks"), unreachable)
    assert info.value.problem.status == 503
    assert info.value.headers.get("Retry-After") == "5"


def test_every_route_declares_the_503_a_database_outage_gives() -> None:
    """Any /v1 route answers 503 with Retry-After while PostgreSQL is away."""
    spec = build_openapi("http://127.0.0.1:8000")
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            answer = op["responses"].get("503")
            assert answer is not None and "Retry-After" in answer["headers"], (path, method)


# ---------------------------------------------------------------- lost insert replies


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.AdminShutdownError("terminating connection"),
    ],
)
def test_a_broken_connection_leaves_an_insert_unknown(exc: BaseException) -> None:
    assert reply_lost(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.DataError("value out of range"),
        asyncpg.QueryCanceledError("statement timeout"),
        asyncpg.LockNotAvailableError("lock"),
        ValueError("a bug"),
    ],
)
def test_an_error_the_server_answered_means_not_committed(exc: BaseException) -> None:
    assert not reply_lost(exc)


def test_a_lost_insert_committed_when_all_its_tasks_are_stored() -> None:
    a, b = uuid7(), uuid7()
    assert committed([a, b], {a, b, uuid7()})
    assert not committed([a, b], set())
    with pytest.raises(RuntimeError):
        committed([a, b], {b})


async def test_an_unknown_insert_outcome_is_a_504_that_promises_nothing() -> None:
    """Not a 503, which the contract makes a promise that nothing was accepted: the task
    may be stored and run. A 504 outcome-unknown, saying a keyed retry is safe."""

    async def unknown(request: web.Request) -> web.StreamResponse:
        raise OutcomeUnknown("lost, then PostgreSQL away")

    with pytest.raises(ProblemException) as info:
        await dependency_middleware(make_mocked_request("POST", "/v1/tasks"), unknown)
    problem = info.value.problem
    assert problem.status == 504 and info.value.headers.get("Retry-After") == "5"
    assert problem.type.endswith("/outcome-unknown"), problem
    assert "may have been accepted" in (problem.detail or "")
    assert "retry with the same Idempotency-Key is safe" in (problem.detail or "")


def test_the_submit_routes_declare_the_504_of_an_unknown_outcome() -> None:
    spec = build_openapi("http://127.0.0.1:8000")
    for path in ("/v1/tasks", "/v1/tasks:batch"):
        answer = spec["paths"][path]["post"]["responses"]["504"]
        assert "Retry-After" in answer["headers"] and "Idempotency-Key" in answer["description"]
        assert "rarely" not in spec["paths"][path]["post"]["responses"]["503"]["description"]


def test_the_queue_depths_age_grows_while_no_sample_comes() -> None:
    """The depth gauges keep their last value while the broker is unreachable: the age
    of that value is what tells a dashboard (read at each scrape)."""
    monitor = _monitor()
    monitor.sampled_at = time.monotonic() - 600
    stale = REGISTRY.get_sample_value("longhaul_api_queue_depth_age_seconds")
    assert stale is not None and stale >= 600
    monitor.sampled_at = time.monotonic()
    fresh = REGISTRY.get_sample_value("longhaul_api_queue_depth_age_seconds")
    assert fresh is not None and fresh < 600
