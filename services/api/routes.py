"""The ``/v1`` handlers. Each one: authenticate, rate-limit, validate, admit, act."""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError
from redis.exceptions import RedisError

from services.api import requests as rq
from services.api import scheduling
from services.api.context import SERVICES, Services
from services.api.problems import ProblemException, validation_problem
from services.api.repository import Principal, ScheduleLimit
from services.api.views import schedule_document, task_document
from shared import cron, deadletters, tasktypes, wstokens
from shared.ids import random_hex, uuid7
from shared.logging import trace_id_var
from shared.newtasks import NewTask
from shared.schemas import (
    BatchRequest,
    ProblemError,
    ScheduleRequest,
    ScheduleUpdate,
    TaskRequest,
    WsTokenRequest,
    format_ts,
    schedule_task,
    summary,
)
from shared.states import RERUNNABLE
from shared.taskrows import Row, event_from_row

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# How stale a queue-depth sample may be before we assume the broker is unreachable.
_MAX_SAMPLE_AGE_S = 3.0
# Retry-After of a refusal for the store of delayed tasks being full. Its rows leave it
# as they come due, at times the count does not tell (a minute or a month away), so no
# honest estimate exists: a fixed minute, the longest Retry-After of a full queue, paces
# the retries of work that is not urgent by nature.
_DELAYED_FULL_RETRY_S = 60


def _document(
    document: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(document),
        status=status,
        headers=headers,
        content_type="application/json",
    )


async def _principal(request: web.Request, cost: int = 1) -> tuple[Services, Principal]:
    """Authenticate, then take ``cost`` tokens from the tenant's bucket (0: not yet)."""
    svc = request.app[SERVICES]
    principal = await svc.auth.authenticate(request)
    if cost:
        await _rate_limit(svc, principal, cost)
    return svc, principal


async def _rate_limit(svc: Services, principal: Principal, cost: int) -> None:
    decision = await svc.limiter.take(
        principal.tenant_id, cost, principal.rate_limit_per_s, principal.rate_burst
    )
    if not decision.allowed:
        raise ProblemException(
            429,
            "Too Many Requests",
            "this tenant is over its rate limit; retry after the delay",
            slug="rate-limited",
            headers={"Retry-After": str(decision.retry_after_s)},
        )


@contextlib.contextmanager
def _admit(svc: Services, count: int = 1, delayed: int = 0) -> Iterator[None]:
    """Refuse (503) before writing anything when the backlog is over its limit, when
    ``delayed`` (of the ``count`` tasks, those with a delay) would take the store of
    delayed tasks past its own, or when the broker is unreachable or refusing: we only
    answer 202 for work we can keep. A batch larger than a limit itself is a 422: no
    retry could ever admit it. Wraps the transaction that stores the tasks, which the
    monitor counts until it sees them."""
    _fits_at_all(svc, count, delayed)
    monitor = svc.monitor
    if not monitor.fresh(_MAX_SAMPLE_AGE_S) or (svc.relay is not None and svc.relay.refusing):
        raise ProblemException(
            503,
            "Service Unavailable",
            "the message broker is unreachable or refusing messages",
            slug="broker-unavailable",
            headers={"Retry-After": "5"},
        )
    limit = svc.settings.max_queue_depth
    depth = monitor.estimated_depth
    if depth + count > limit:  # a batch counts whole: it may not take the queue past it
        retry = monitor.estimator.retry_after(depth + count - 1, limit)
        raise ProblemException(
            503,
            "Service Unavailable",
            f"the task queue is at its limit ({depth} queued, {count} more, limit {limit})",
            slug="queue-full",
            headers={"Retry-After": str(retry)},
        )
    if delayed:  # tasks without a delay never wait for this limit
        delayed_limit = svc.settings.max_delayed_tasks
        stored = monitor.estimated_delayed
        if stored + delayed > delayed_limit:  # a batch counts whole here too
            raise ProblemException(
                503,
                "Service Unavailable",
                f"the store of delayed tasks is at its limit ({stored} stored, {delayed} more,"
                f" limit {delayed_limit}); tasks without a delay are still accepted",
                slug="delayed-full",
                headers={"Retry-After": str(_DELAYED_FULL_RETRY_S)},
            )
    with monitor.admitting(count, delayed):
        yield


def _fits_at_all(svc: Services, count: int, delayed: int) -> None:
    """A 422 for a batch that no retry could admit whole, however empty the queue."""
    settings = svc.settings
    if count > settings.max_queue_depth:
        raise _too_large(count, "tasks", settings.max_queue_depth, "the task queue", "QUEUE_DEPTH")
    if delayed > settings.max_delayed_tasks:
        raise _too_large(
            delayed,
            "tasks with a delay_s",
            settings.max_delayed_tasks,
            "the store of delayed tasks",
            "DELAYED_TASKS",
        )


def _too_large(many: int, what: str, limit: int, where: str, setting: str) -> ProblemException:
    msg = f"{many} {what}, more than the limit of {where} ({limit}, LONGHAUL_MAX_{setting})"
    return ProblemException(
        422,
        "Batch too large",
        f"{msg}: no retry can accept this batch whole; send at most {limit} {what} a batch",
        slug="batch-too-large",
        errors=[ProblemError(loc=["body", "tasks"], msg=msg)],
    )


async def _check_types(
    svc: Services, tasks: Sequence[TaskRequest], prefix: Sequence[list[str | int]]
) -> list[rq.Typed]:
    """Refuse unknown types and bad args; return the tasks with their type's defaults
    where they set none, and their args schemas."""
    typed, errors = await _typed(svc, tasks, prefix)
    if errors:
        raise _invalid(errors)
    return typed


async def _typed(
    svc: Services, tasks: Sequence[TaskRequest], prefix: Sequence[list[str | int]]
) -> tuple[list[rq.Typed], list[ProblemError]]:
    """The tasks of known types with their type's defaults and args schemas, and the
    errors of the others: unknown types, args their type's schema refuses."""
    errors: list[ProblemError] = []
    typed: list[rq.Typed] = []
    for task, loc in zip(tasks, prefix, strict=True):
        info = await svc.types.get(task.type)
        request, refused = tasktypes.check(info, task, loc)
        errors += refused
        if info is not None:
            typed.append(rq.Typed(request, info.args_schema))
    return typed, errors


def _invalid(errors: Sequence[ProblemError]) -> ProblemException:
    return ProblemException(
        422, "Invalid request", summary(errors), slug="validation", errors=errors
    )


def _submitted(svc: Services, rows: Sequence[Row]) -> None:
    """After the commit of new tasks, which the insert handed to our relay: wake its
    poll only for a delayed one, so that it sleeps until that one is due."""
    if svc.relay is not None and any(r["next_attempt_at"] is not None for r in rows):
        svc.relay.wake()


async def _requeued(svc: Services, rows: Sequence[Row]) -> None:
    """After the commit of a retry or a redrive: announce the queued events to clients
    already watching, then wake our relay. In that order the event of this seq is in
    Redis before a worker can write the next one."""
    await svc.events.emit([event_from_row(r) for r in rows])
    if svc.relay is not None:
        svc.relay.wake()


def _trace_id(request: web.Request) -> str:
    trace = rq.trace_id(request.headers.get("traceparent")) or random_hex()
    trace_id_var.set(trace)
    return trace


@routes.post("/v1/tasks")
async def submit(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    key = rq.idempotency_key(request)
    task = rq.validate(TaskRequest, await rq.read_json(request))
    [typed] = await _check_types(svc, [task], [["body"]])
    # Of what will run (the type's and the args schema's defaults in, numbers by
    # value), not of what the client sent.
    fingerprint = rq.request_hash(typed) if key else None
    keys = None if key is None else [key]
    if keys is not None:
        earlier = await svc.repo.by_idempotency_keys(principal.tenant_id, keys)
        if earlier:
            return _replay(svc, earlier[0], task, typed)
    new = NewTask(id=uuid7(), request=typed.request, trace_id=_trace_id(request))
    with _admit(svc, delayed=int(typed.request.delay_s > 0)):
        rows = await svc.repo.insert(principal.tenant_id, [new], keys, fingerprint)
    if not rows:  # lost a race with an earlier request under the key: answer as its replay
        assert keys is not None
        [winner, *_] = await _race_winners(svc, principal.tenant_id, keys)
        return _replay(svc, winner, task, typed)
    _submitted(svc, rows)
    view = task_document(rows[0], svc.settings.public_ws_url)
    log.debug("task accepted", extra={"task_id": view["id"], "type": view["type"]})
    return _document(view, 202, {"Location": view["links"]["self"]})


async def _race_winners(svc: Services, tenant_id: uuid.UUID, keys: list[str]) -> list[Row]:
    """The rows stored under ``keys`` by the request that took them while we tried to;
    a 409 if there are none by now (deleted already)."""
    found = await svc.repo.by_idempotency_keys(tenant_id, keys)
    if not found:
        raise ProblemException(409, "Conflict", "retry the request", slug="conflict")
    return found


def _replay(svc: Services, earlier: Row, sent: TaskRequest, typed: rq.Typed) -> web.Response:
    if not rq.same_request(bytes(earlier["request_hash"] or b""), sent, typed):
        raise rq.key_reused()
    view = task_document(earlier, svc.settings.public_ws_url)
    return _document(view, 200, {"Location": view["links"]["self"], "Idempotent-Replayed": "true"})


@routes.post("/v1/tasks:batch")
async def submit_batch(request: web.Request) -> web.Response:
    # A batch costs one token per task: one now (a body refused as bad costs that
    # one, else 400s and 422s of 1,000 items each were free), the rest once it is read.
    svc, principal = await _principal(request, cost=1)
    key = rq.idempotency_key(request)
    data = await rq.read_json(request)
    try:
        batch = BatchRequest.model_validate(data)
    except ValidationError as exc:
        # Name every bad item at once: add the type/args errors of the items that
        # passed the schema to the schema errors of the others.
        problem = validation_problem(exc)
        items = data.get("tasks") if isinstance(data, dict) else None
        if isinstance(items, list) and problem.problem.errors is not None:
            for i, item in enumerate(items[:1000]):
                try:
                    await _check_types(
                        svc, [TaskRequest.model_validate(item)], [["body", "tasks", i]]
                    )
                except ValidationError:
                    continue
                except ProblemException as more:
                    problem.problem.errors.extend(more.problem.errors or [])
        raise problem from None
    if len(batch.tasks) > 1:
        await _rate_limit(svc, principal, len(batch.tasks) - 1)
    tasks = await _check_types(
        svc, batch.tasks, [["body", "tasks", i] for i in range(len(batch.tasks))]
    )
    keys = None if key is None else rq.batch_keys(key, len(tasks))
    fingerprint = rq.batch_hash(tasks) if key else None

    def same(stored: bytes) -> bool:
        return rq.same_batch(stored, tasks)

    if keys is not None:
        earlier = await svc.repo.by_idempotency_keys(principal.tenant_id, keys)
        if earlier:
            return _batch_replay(svc, rq.batch_replayed(earlier, keys, same))
    trace = _trace_id(request)
    new = [NewTask(id=uuid7(), request=t.request, trace_id=trace) for t in tasks]
    with _admit(svc, len(new), delayed=sum(t.request.delay_s > 0 for t in tasks)):
        rows = await svc.repo.insert(principal.tenant_id, new, keys, fingerprint)
    if not rows:  # lost a race with an earlier request under the key: answer as its replay
        assert keys is not None
        earlier = await _race_winners(svc, principal.tenant_id, keys)
        return _batch_replay(svc, rq.batch_replayed(earlier, keys, same))
    _submitted(svc, rows)
    by_id = {r["id"]: r for r in rows}
    views = [task_document(by_id[t.id], svc.settings.public_ws_url) for t in new]
    return _document({"tasks": views}, 202)


def _batch_replay(svc: Services, earlier: Sequence[Row]) -> web.Response:
    views = [task_document(r, svc.settings.public_ws_url) for r in earlier]
    return _document({"tasks": views}, 200, {"Idempotent-Replayed": "true"})


@routes.get("/v1/tasks/{id}")
async def get_task(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    row = await svc.repo.get(principal.tenant_id, rq.path_id(request))
    if row is None:
        raise ProblemException(404, "Not Found", "no such task", slug="not-found")
    return _document(task_document(row, svc.settings.public_ws_url))


@routes.get("/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    q = rq.list_query(request)
    rows = await svc.repo.list_tasks(
        principal.tenant_id,
        state=q.state.value if q.state else None,
        type_=q.type,
        before=q.before,
        limit=q.limit + 1,
        created_after=q.created_after,
        created_before=q.created_before,
    )
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return _document(
        {
            "items": [task_document(r, svc.settings.public_ws_url) for r in rows],
            "next_cursor": rq.encode_cursor(rows[-1]["id"]) if more else None,
        }
    )


@routes.post("/v1/tasks/{id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    outcome, row = await svc.repo.cancel(principal.tenant_id, rq.path_id(request))
    if row is None:
        raise ProblemException(404, "Not Found", "no such task", slug="not-found")
    if outcome == "terminal":
        raise ProblemException(
            409, "Conflict", f"the task is already {row['state']}", slug="task-terminal"
        )
    if outcome == "cancelled":
        await svc.events.emit([event_from_row(row)])
    else:
        await _tell_workers(svc, {"op": "cancel", "task_id": str(row["id"])})
    return _document(task_document(row, svc.settings.public_ws_url), 202)


async def _tell_workers(svc: Services, command: dict[str, Any]) -> None:
    """Best effort: a worker that misses it sees cancel_requested_at at its heartbeat."""
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        await svc.redis.publish(svc.wire.control_channel, orjson.dumps(command))


@routes.post("/v1/tasks/{id}/retry")
async def retry_task(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    task_id = rq.path_id(request)
    # Not a hot path: one more read so that a retry that cannot be carried out is told so
    # under back pressure too, not a 503 telling the client to try again later.
    state = await svc.repo.task_state(principal.tenant_id, task_id)
    if state is None:
        raise ProblemException(404, "Not Found", "no such task", slug="not-found")
    if state not in RERUNNABLE:
        raise _not_retryable(state)
    with _admit(svc):
        outcome, row = await svc.repo.retry(principal.tenant_id, task_id)
    if row is None:  # purged (retention) since the read
        raise ProblemException(404, "Not Found", "no such task", slug="not-found")
    if outcome == "conflict":  # another retry got there first
        raise _not_retryable(row["state"])
    await _requeued(svc, [row])
    return _document(task_document(row, svc.settings.public_ws_url), 202)


def _not_retryable(state: str) -> ProblemException:
    return ProblemException(
        409,
        "Conflict",
        f"only failed or cancelled tasks can be retried; this one is {state}",
        slug="task-not-retryable",
    )


@routes.get("/v1/task-types")
async def task_types(request: web.Request) -> web.Response:
    svc, _ = await _principal(request)
    items = [
        {
            "name": t.name,
            "args_schema": t.args_schema,
            "last_seen_at": None if t.last_seen_at is None else format_ts(t.last_seen_at),
        }
        for t in await svc.types.all()
    ]
    return web.Response(body=orjson.dumps({"items": items}), content_type="application/json")


@routes.post("/v1/ws-tokens")
async def ws_token(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    scope = None
    # No body (or an empty one, chunked or not): a single-use token, as before.
    if request.can_read_body and await request.read():
        scope = rq.validate(WsTokenRequest, await rq.read_json(request)).task_id
    if scope is not None and await svc.repo.task_state(principal.tenant_id, scope) is None:
        raise ProblemException(404, "Not Found", "no such task", slug="not-found")
    unavailable = ProblemException(
        503,
        "Service Unavailable",
        "Redis is unreachable",
        slug="redis-unavailable",
        headers={"Retry-After": "5"},
    )
    breaker = svc.events.breaker
    if not breaker.allow():
        raise unavailable
    try:
        ttl = svc.settings.ws_token_ttl_s if scope is None else svc.settings.task_token_ttl_s
        token, expires = await wstokens.issue(
            svc.redis, svc.wire, principal.tenant_id, ttl, key_id=principal.key_id, task_id=scope
        )
    except (RedisError, OSError, TimeoutError):
        breaker.failed()
        raise unavailable from None
    breaker.succeeded()
    answer: dict[str, Any] = {"token": token, "expires_at": format_ts(expires)}
    if scope is not None:
        answer["task_id"] = str(scope)
    return web.Response(
        body=orjson.dumps(answer),
        status=201,
        content_type="application/json",
    )


@routes.get("/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    q = rq.list_query(request, filters=False)
    rows = await svc.repo.dead_letters(principal.tenant_id, q.before, q.limit + 1)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    body = {
        "items": [deadletters.as_json(r) for r in rows],
        "next_cursor": rq.encode_cursor(rows[-1]["id"]) if more else None,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _redrive_refused(outcome: deadletters.Redrive) -> ProblemException:
    if outcome is deadletters.Redrive.MISSING:
        return ProblemException(404, "Not Found", "no such dead letter", slug="not-found")
    return ProblemException(
        409, "Conflict", f"cannot redrive: {outcome.value}", slug="not-redrivable"
    )


@routes.post("/v1/dead-letters/{id}/redrive")
async def redrive_dead_letter(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    letter_id = rq.path_id(request, "dead letter")
    # As for a retry: a redrive that cannot be carried out is told so under back
    # pressure too.
    blocker = await svc.repo.redrive_blocker(principal.tenant_id, letter_id)
    if blocker is not None:
        raise _redrive_refused(blocker)
    with _admit(svc):
        result = await svc.repo.redrive(principal.tenant_id, letter_id)
    done = result.outcome is deadletters.Redrive.DONE
    if not done or result.dead_letter is None or result.task is None:
        raise _redrive_refused(result.outcome)
    await _requeued(svc, [result.task])
    body = {
        **deadletters.as_json(result.dead_letter),
        "task": task_document(result.task, svc.settings.public_ws_url),
    }
    return web.Response(body=orjson.dumps(body), status=202, content_type="application/json")


# ---------------------------------------------------------------- schedules


def _cron_errors(expression: str, loc: list[str | int]) -> list[ProblemError]:
    try:
        cron.parse(expression)
    except cron.CronError as exc:
        return [ProblemError(loc=loc, msg=str(exc))]
    return []


def _no_schedule() -> ProblemException:
    return ProblemException(404, "Not Found", "no such schedule", slug="not-found")


@routes.post("/v1/schedules")
async def create_schedule(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    new = rq.validate(ScheduleRequest, await rq.read_json(request))
    # Its tasks are checked as a submission of them would be (_typed): a schedule
    # whose every fire would be refused is refused now.
    _, refused = await _typed(svc, [new.task()], [["body"]])
    errors = _cron_errors(new.cron, ["body", "cron"]) + refused
    if errors:
        raise _invalid(errors)
    try:
        row = await svc.repo.create_schedule(
            principal.tenant_id,
            new,
            functools.partial(scheduling.first_run, new),
            svc.settings.max_schedules_per_tenant,
        )
    except ScheduleLimit as exc:
        raise ProblemException(
            409,
            "Conflict",
            f"this tenant has {exc.limit} schedules, as many as this deployment allows"
            " (LONGHAUL_MAX_SCHEDULES_PER_TENANT): delete one first",
            slug="schedule-limit",
        ) from None
    if row is None:
        raise ProblemException(
            409,
            "Conflict",
            f"this tenant already has a schedule named {new.name!r}",
            slug="schedule-exists",
        )
    view = schedule_document(row)
    log.info("schedule created", extra={"schedule_id": view["id"], "type": new.type})
    return _document(view, 201, {"Location": view["links"]["self"]})


@routes.get("/v1/schedules")
async def list_schedules(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    q = rq.list_query(request, filters=False)
    rows = await svc.repo.list_schedules(principal.tenant_id, q.before, q.limit + 1)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return _document(
        {
            "items": [schedule_document(r) for r in rows],
            "next_cursor": rq.encode_cursor(rows[-1]["id"]) if more else None,
        }
    )


@routes.get("/v1/schedules/{id}")
async def get_schedule(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    row = await svc.repo.schedule(principal.tenant_id, rq.path_id(request, "schedule"))
    if row is None:
        raise _no_schedule()
    return _document(schedule_document(row))


@routes.patch("/v1/schedules/{id}")
async def update_schedule(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    schedule_id = rq.path_id(request, "schedule")
    change = rq.validate(ScheduleUpdate, await rq.read_json(request))
    errors = [] if change.cron is None else _cron_errors(change.cron, ["body", "cron"])
    if change.args is not None:
        # New args are checked against the type as it is registered now, as a
        # submission's would be: the schedule's own type, priority and attempts.
        current = await svc.repo.schedule(principal.tenant_id, schedule_id)
        if current is None:
            raise _no_schedule()
        task = schedule_task(
            current["type"],
            change.args,
            current["priority"],
            current["max_attempts"],
            current["timeout_s"],
        )
        _, refused = await _typed(svc, [task], [["body"]])
        errors += refused
    if errors:
        raise _invalid(errors)
    row = await svc.repo.update_schedule(
        principal.tenant_id, schedule_id, change, functools.partial(scheduling.next_run, change)
    )
    if row is None:
        raise _no_schedule()
    return _document(schedule_document(row))


@routes.delete("/v1/schedules/{id}")
async def delete_schedule(request: web.Request) -> web.Response:
    svc, principal = await _principal(request)
    if not await svc.repo.delete_schedule(principal.tenant_id, rq.path_id(request, "schedule")):
        raise _no_schedule()
    return web.Response(status=204)
