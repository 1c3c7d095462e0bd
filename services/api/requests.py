"""Reading and validating request bodies and parameters into the contract's errors."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from services.api import meaning
from services.api.problems import ProblemException, validation_problem
from services.api.timestamps import BadTimestamp, parse_rfc3339
from shared.digits import decimal_int
from shared.jsonsafe import MAX_DEPTH, deeper_than, nul_path
from shared.schemas import ProblemError, TaskRequest, TaskState, is_task_type, summary
from shared.taskrows import Row

M = TypeVar("M", bound=BaseModel)

_IDEMPOTENCY_MAX = 255
# W3C Trace Context: version-traceid-parentid-flags in lowercase hex; a later version
# may append fields after a dash, version 00 may not.
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")


async def read_json(request: web.Request) -> Any:
    """The body as JSON: 415 unless it says application/json, 413 if too large, 400 if
    not JSON, 422 if it nests deeper than MAX_DEPTH or holds a NUL character (valid JSON,
    but not JSON we can keep and answer with). aiohttp enforces the size limit (client_max_size) while reading."""
    if request.content_type != "application/json":
        raise ProblemException(
            415,
            "Unsupported Media Type",
            "send the body as Content-Type: application/json",
            slug="unsupported-media-type",
        )
    raw = await request.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProblemException(
            400, "Bad Request", _not_json(raw, exc), slug="invalid-json"
        ) from None
    # Counting brackets is cheap and bounds the depth: most bodies skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and deeper_than(data, MAX_DEPTH):
        raise ProblemException(
            422,
            "Invalid request",
            f"the body nests arrays and objects more than {MAX_DEPTH} levels deep",
            slug="validation",
            errors=[ProblemError(loc=["body"], msg=f"nested more than {MAX_DEPTH} levels")],
        )
    # Only an escaped NUL can be in valid JSON: most bodies skip the walk.
    if b"\\u0000" in raw and (where := nul_path(data, ["body"])) is not None:
        raise ProblemException(
            422,
            "Invalid request",
            "strings must not contain \\u0000",
            slug="validation",
            errors=[ProblemError(loc=where, msg="contains \\u0000")],
        )
    return data


def _not_json(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why ``raw`` is not JSON, in the client's terms: orjson calls any byte that is not
    UTF-8 "surrogates not allowed", surrogates sent or not."""
    try:
        raw.decode()
    except UnicodeDecodeError as bad:
        return f"the body is not valid UTF-8 (at byte {bad.start}); JSON must be UTF-8"
    return f"the body is not valid JSON: {exc}"


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    # Printable ASCII, the space included (HTTP has stripped it from the ends already).
    if not 1 <= len(key) <= _IDEMPOTENCY_MAX or not all(32 <= ord(c) <= 126 for c in key):
        raise ProblemException(
            422,
            "Invalid request",
            "Idempotency-Key must be 1..255 printable ASCII characters",
            slug="validation",
            errors=[ProblemError(loc=["header", "Idempotency-Key"], msg="1..255 printable ASCII")],
        )
    return key


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a valid ``traceparent`` header, else None: per W3C Trace Context
    an invalid one is ignored (a new trace starts), never propagated."""
    if traceparent is None:
        return None
    match = _TRACEPARENT_RE.fullmatch(traceparent)
    if match is None:
        return None
    version, trace, parent, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace == "0" * 32 or parent == "0" * 16:
        return None
    return trace


# An Idempotency-Key's fingerprint starts with the version of its computation. Those
# stored before had none: a bare sha256 (32 bytes) of the request as sent. Version 1
# hashed the args as sent; version 2 as the handler gets them (``meaning``). A stored
# fingerprint is compared as it was made, so a client retrying across an upgrade still
# gets its replay.
_FINGERPRINT_V1 = b"\x01"
_FINGERPRINT_BATCH_V1 = b"\x02"
_FINGERPRINT_V2 = b"\x03"
_FINGERPRINT_BATCH_V2 = b"\x04"
_LEGACY_FINGERPRINT_LEN = hashlib.sha256().digest_size


@dataclass(frozen=True)
class Typed:
    """A request as its task will run: ``request`` with its type's own defaults where it
    set none (what is stored), and the type's args schema, whose defaults its handler
    gets for the args it leaves out."""

    request: TaskRequest
    args_schema: Mapping[str, Any]


def _sha256(value: Any) -> bytes:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).digest()


def _meaning(typed: Typed) -> Any:
    """The request as its handler will run it: the type's defaults in, the args
    schema's defaults in, numbers by value. Key order never counts (sorted keys)."""
    doc = typed.request.model_dump(mode="json")
    doc["args"] = meaning.with_defaults(typed.args_schema, doc["args"])
    return meaning.by_value(doc)


def request_hash(typed: Typed) -> bytes:
    """Fingerprint of a request's meaning as its task will run (``_meaning``): two
    requests whose handlers would get the same task have the same one. (So a type whose
    defaults change between two requests makes them two requests.)"""
    return _FINGERPRINT_V2 + _sha256(_meaning(typed))


def request_hash_v1(typed: TaskRequest) -> bytes:
    """Version 1: the request with its type's defaults, its args as sent."""
    return _FINGERPRINT_V1 + _sha256(typed.model_dump(mode="json"))


def legacy_request_hash(sent: TaskRequest) -> bytes:
    """The fingerprint stored before the version byte: the request as sent (the
    contract's defaults filled, not its type's), no version byte."""
    return _sha256(sent.model_dump(mode="json"))


def batch_hash(typed: Sequence[Typed]) -> bytes:
    """Fingerprint of a batch's meaning: each item's as ``request_hash`` takes it, in
    order, under a version of its own, which no single request's fingerprint can equal."""
    return _FINGERPRINT_BATCH_V2 + _sha256([_meaning(t) for t in typed])


def batch_hash_v1(typed: Sequence[TaskRequest]) -> bytes:
    """Version 1 of ``batch_hash``: the items as ``request_hash_v1`` takes them."""
    return _FINGERPRINT_BATCH_V1 + _sha256([t.model_dump(mode="json") for t in typed])


def same_request(stored: bytes, sent: TaskRequest, typed: Typed) -> bool:
    """Whether a request repeats the one whose fingerprint is ``stored``, computed as
    ``stored`` was. A batch's fingerprint (another version) never matches."""
    if len(stored) == _LEGACY_FINGERPRINT_LEN:
        return stored == legacy_request_hash(sent)
    version = stored[:1]
    if version == _FINGERPRINT_V1:
        return stored == request_hash_v1(typed.request)
    return version == _FINGERPRINT_V2 and stored == request_hash(typed)


def same_batch(stored: bytes, typed: Sequence[Typed]) -> bool:
    """``same_request`` for a batch: a single request's fingerprint never matches."""
    version = stored[:1]
    if version == _FINGERPRINT_BATCH_V1:
        return stored == batch_hash_v1([t.request for t in typed])
    return version == _FINGERPRINT_BATCH_V2 and stored == batch_hash(typed)


def batch_keys(key: str, count: int) -> list[str]:
    """The keys a batch sent with ``key`` stores its tasks under, in order. The first is
    the key itself, so a batch and a single request under one key meet in the unique
    index (the later one waits for the earlier, then finds it); the others add a line
    feed and the index, which no client's key can hold (printable only)."""
    return [key] + [f"{key}\n{i}" for i in range(1, count)]


def key_reused() -> ProblemException:
    return ProblemException(
        422,
        "Idempotency-Key reused",
        "this Idempotency-Key was used with another body",
        slug="idempotency-key-reused",
        errors=[ProblemError(loc=["header", "Idempotency-Key"], msg="reused with another body")],
    )


def batch_replayed(
    found: Sequence[Row], keys: Sequence[str], same: Callable[[bytes], bool]
) -> list[Row]:
    """The earlier batch's tasks in request order, from the rows ``found`` under
    ``keys`` (``batch_keys``): a 422 if any was stored by another request (``same`` of
    its fingerprint false), a 409 if the batch is the same but some of its tasks are
    gone (deleted after the retention), so it can be neither replayed whole nor
    submitted again under this key. Pure."""
    # A batch's rows share one fingerprint: each distinct one is compared once.
    if not all(same(stored) for stored in {bytes(r["request_hash"] or b"") for r in found}):
        raise key_reused()
    by_key = {r["idempotency_key"]: r for r in found}
    if len(by_key) != len(keys):
        raise ProblemException(
            409,
            "Conflict",
            f"{len(keys) - len(by_key)} of the {len(keys)} tasks stored under this"
            " Idempotency-Key have been deleted (task retention): send the batch with a new key",
            slug="conflict",
        )
    return [by_key[k] for k in keys]


def path_id(request: web.Request, what: str = "task") -> UUID:
    """The path's id; a malformed one cannot exist, so it is simply not found."""
    try:
        return UUID(request.match_info["id"])
    except ValueError:
        raise ProblemException(404, "Not Found", f"no such {what}", slug="not-found") from None


class ListQuery(BaseModel):
    state: TaskState | None = None
    type: str | None = None
    limit: int = 50
    before: UUID | None = None
    # The time window on created_at: from created_after (inclusive) to created_before
    # (exclusive), so adjacent windows neither overlap nor leave a gap.
    created_after: datetime | None = None
    created_before: datetime | None = None


PAGE_PARAMETERS = ("limit", "cursor")
# GET /v1/tasks's own, besides the page's (the OpenAPI document lists the same).
TASK_FILTERS = ("state", "type", "created_after", "created_before")


def list_query(request: web.Request, *, filters: bool = True) -> ListQuery:
    """``limit`` and ``cursor``, and with ``filters`` also the task filters, each given
    at most once: the contract gives each one value, and a repeat silently read as its
    first (``state=failed&state=cancelled``: only failed) answers another query than the
    one asked. A cursor is an id: the next page's request repeats the filters, time
    window included, and gets the window's tasks older than the cursor."""
    errors: list[ProblemError] = []
    known = set(PAGE_PARAMETERS) | (set(TASK_FILTERS) if filters else set())
    unknown = set(request.query) - known
    errors += [
        ProblemError(loc=["query", name], msg="unknown parameter") for name in sorted(unknown)
    ]
    repeated = sorted(name for name in known if len(request.query.getall(name, ())) > 1)
    errors += [
        ProblemError(loc=["query", name], msg="given more than once; it takes one value")
        for name in repeated
    ]
    q = {name: request.query[name] for name in known - set(repeated) if name in request.query}
    state = None
    if "state" in q:
        try:
            state = TaskState(q["state"])
        except ValueError:
            errors.append(
                ProblemError(
                    loc=["query", "state"],
                    msg=f"must be one of {', '.join(s.value for s in TaskState)}",
                )
            )
    type_ = q.get("type")
    if type_ is not None and not is_task_type(type_):
        errors.append(ProblemError(loc=["query", "type"], msg="not a task type name"))
    window: dict[str, datetime] = {}
    for name in ("created_after", "created_before"):
        if name in q:
            try:
                window[name] = parse_rfc3339(q[name])
            except BadTimestamp as exc:
                errors.append(ProblemError(loc=["query", name], msg=str(exc)))
    if len(window) == 2 and window["created_after"] >= window["created_before"]:
        errors.append(
            ProblemError(loc=["query", "created_before"], msg="must be later than created_after")
        )
    limit = 50
    if "limit" in q:
        parsed = decimal_int(q["limit"], 1, 500)
        if parsed is None:
            errors.append(ProblemError(loc=["query", "limit"], msg="an integer from 1 to 500"))
        else:
            limit = parsed
    before = None
    if q.get("cursor"):
        before = decode_cursor(q["cursor"])
        if before is None:
            errors.append(ProblemError(loc=["query", "cursor"], msg="not a cursor we issued"))
    if errors:
        # As a body's validation problem says it: "query.state: given more than once".
        raise ProblemException(
            422, "Invalid request", summary(errors), slug="validation", errors=errors
        )
    return ListQuery(state=state, type=type_, limit=limit, before=before, **window)


def encode_cursor(last: UUID) -> str:
    return base64.urlsafe_b64encode(last.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> UUID | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        return None
    return UUID(bytes=raw) if len(raw) == 16 else None
