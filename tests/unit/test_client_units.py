"""The Python clients' own logic: its SSE reading, what it retries and what it never
does, and the synchronous client's bridge to it (threads, close, misuse), against small
HTTP servers of ours that answer as the API and the gateway do."""

from __future__ import annotations

import asyncio
import inspect
import signal
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from longhaul import Client, LonghaulError, RetryPolicy, SyncClient
from longhaul.client import retry_delay, stream_base
from longhaul.sse import Message, Parser
from services.api.timestamps import parse_rfc3339
from shared.backoff import Backoff
from shared.ids import uuid7
from tests.support import ROOT, timeout

TASK_ID = uuid7()
NO_WAIT = RetryPolicy(attempts=4, backoff=Backoff(base_s=0.0, cap_s=0.0))


def _task(state: str = "queued", last_seq: int = 1, events: str = "ws://gw/v1/ws") -> Any:
    return {
        "id": str(TASK_ID),
        "type": "demo.sleep",
        "args": {},
        "state": state,
        "progress": 0.0,
        "message": None,
        "result": None,
        "error": None,
        "attempts": 0,
        "max_attempts": 5,
        "priority": 0,
        "timeout_s": 600.0,
        "created_at": "2026-12-07T10:00:00.000Z",
        "started_at": None,
        "finished_at": None,
        "updated_at": "2026-12-07T10:00:00.000Z",
        "last_seq": last_seq,
        "links": {"self": f"/v1/tasks/{TASK_ID}", "events": events},
    }


def _event(seq: int, state: str) -> bytes:
    frame = {
        "type": "event",
        "task_id": str(TASK_ID),
        "seq": seq,
        "state": state,
        "progress": 1.0 if state == "succeeded" else 0.0,
        "message": None,
        "data": None,
        "ts": "2026-12-07T10:00:00.000Z",
    }
    return b"id: %d\ndata: %s\n\n" % (seq, orjson.dumps(frame))


def _problem(status: int, **extra: Any) -> web.Response:
    body = {"type": "about:blank", "title": "x", "status": status, "detail": "d", **extra}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/problem+json"
    )


Route = Callable[[web.Request], Any]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[tuple[str, str], Route]], Any]]:
    servers: list[TestServer] = []

    async def start(routes: dict[tuple[str, str], Route]) -> str:
        app = web.Application()
        for (method, path), handler in routes.items():
            app.router.add_route(method, path, handler)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


# ---------------------------------------------------------------- pure parts


def test_the_sse_parser_reads_as_eventsource_does() -> None:
    parser = Parser("0")
    lines = [": keepalive", "retry: 1500", "id: 4", 'data: {"a":', "data: 1}", "bogus: x", ""]
    got = [parser.feed(line) for line in lines]
    assert got[:-1] == [None] * 6
    assert got[-1] == Message('{"a":\n1}', "4")
    assert parser.retry_ms == 1500
    # An id alone is no message, but carries on; an id holding NUL is ignored.
    assert [parser.feed(x) for x in ("id: 5", "")] == [None, None]
    assert parser.feed("id: 6\0") is None and parser.last_event_id == "5"
    assert [parser.feed(x) for x in ("data:x", "")] == [None, Message("x", "5")]


@pytest.mark.parametrize(
    ("status", "retry_after", "safe", "expected"),
    [
        (429, "3", False, 3.0),  # refused, nothing done: any request, when told
        (503, "120", False, 60.0),  # a long Retry-After is capped
        (504, None, True, 0.0),  # outcome unknown: a keyed submission or a read
        (504, None, False, None),  # ... but not an unkeyed write
        (None, None, True, 0.0),  # no answer at all: the same
        (None, None, False, None),
        (502, "1", False, None),
        (422, None, True, None),  # the client's to fix
        (409, None, True, None),
    ],
)
def test_what_is_retried(
    status: int | None, retry_after: str | None, safe: bool, expected: float | None
) -> None:
    policy = RetryPolicy(attempts=3, backoff=Backoff(base_s=0.0), max_retry_after_s=60)
    assert retry_delay(policy, 1, status, retry_after, safe_if_lost=safe) == expected
    # Out of tries: nothing is retried.
    assert retry_delay(policy, 3, status, retry_after, safe_if_lost=safe) is None


def test_the_stream_is_on_the_gateway_the_task_names() -> None:
    assert stream_base("wss://live.example.com:8443/v1/ws") == "https://live.example.com:8443"
    assert stream_base("ws://127.0.0.1:8001/v1/ws") == "http://127.0.0.1:8001"


# ---------------------------------------------------------------- against fake servers


async def test_a_submission_is_retried_with_its_key_until_stored(serve: Any) -> None:
    """503 (not accepted) and 504 (outcome unknown) are tried again with the same
    Idempotency-Key, so the API stores the task once; the Task comes back."""
    answers = [_problem(503, request_id="r1"), _problem(504), None]
    keys: list[str | None] = []

    async def submit(request: web.Request) -> web.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        assert await request.json() == {"type": "demo.sleep", "args": {"seconds": 1}}
        answer = answers.pop(0)
        return answer or web.json_response(_task(), status=202)

    api = await serve({("POST", "/v1/tasks"): submit})
    async with Client(api, "lh_k", retry=NO_WAIT) as client:
        task = await client.submit("demo.sleep", {"seconds": 1})
    assert task.id == TASK_ID and task.state == "queued"
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0] is not None


async def test_an_unkeyed_write_whose_answer_was_lost_is_not_sent_again(serve: Any) -> None:
    calls = 0

    async def retry(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return _problem(504, request_id="req-9")

    api = await serve({("POST", "/v1/tasks/{id}/retry"): retry})
    async with Client(api, "lh_k", retry=NO_WAIT) as client:
        with pytest.raises(LonghaulError) as raised:
            await client.retry(TASK_ID)
    assert calls == 1
    assert (raised.value.status, raised.value.request_id) == (504, "req-9")


def _schedule(**fields: Any) -> Any:
    return {
        "id": str(TASK_ID),
        "name": "daily",
        "cron": "0 6 * * *",
        "type": "demo.noop",
        "args": {},
        "priority": 0,
        "max_attempts": None,
        "timeout_s": None,
        "enabled": True,
        "next_run_at": "2026-12-08T06:00:00.000Z",
        "last_run_at": None,
        "last_task_id": None,
        "last_error": None,
        "created_at": "2026-12-07T10:00:00.000Z",
        "updated_at": "2026-12-07T10:00:00.000Z",
        "links": {"self": f"/v1/schedules/{TASK_ID}"},
        **fields,
    }


async def test_schedule_calls_send_what_was_given_and_retry_only_a_change(serve: Any) -> None:
    """A creation sends only what was given (the API and the type fill in the rest), and
    is not sent again after a lost answer (a repeat would find its name taken); a
    change is (it says what to set: twice is once); a deletion's 204 is no error."""
    bodies: list[Any] = []
    lost = {"POST": 1, "PATCH": 1}

    async def create(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        if lost["POST"]:
            lost["POST"] -= 1
            return _problem(504)
        return web.json_response(_schedule(), status=201)

    async def change(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        if lost["PATCH"]:
            lost["PATCH"] -= 1
            return _problem(502)
        return web.json_response(_schedule(enabled=False, next_run_at=None))

    async def delete(request: web.Request) -> web.Response:
        return web.Response(status=204)

    api = await serve(
        {
            ("POST", "/v1/schedules"): create,
            ("PATCH", "/v1/schedules/{id}"): change,
            ("DELETE", "/v1/schedules/{id}"): delete,
        }
    )
    async with Client(api, "lh_k", retry=NO_WAIT) as client:
        with pytest.raises(LonghaulError) as raised:
            await client.create_schedule("daily", "0 6 * * *", "demo.noop", priority=5)
        assert raised.value.status == 504
        made = await client.create_schedule("daily", "0 6 * * *", "demo.noop", priority=5)
        assert made.id == TASK_ID and made.max_attempts is None
        paused = await client.update_schedule(TASK_ID, enabled=False)
        assert paused.enabled is False and paused.next_run_at is None
        assert await client.delete_schedule(TASK_ID) is None
    created = {"name": "daily", "cron": "0 6 * * *", "type": "demo.noop", "enabled": True}
    assert bodies == [
        {**created, "priority": 5},
        {**created, "priority": 5},
        {"enabled": False},
        {"enabled": False},
    ]


async def test_a_problem_is_raised_with_its_errors(serve: Any) -> None:
    async def submit(request: web.Request) -> web.Response:
        return _problem(422, errors=[{"loc": ["body", "type"], "msg": "unknown task type"}])

    api = await serve({("POST", "/v1/tasks"): submit})
    async with Client(api, "lh_k", retry=NO_WAIT) as client:
        with pytest.raises(LonghaulError) as raised:
            await client.submit("nope")
    assert raised.value.status == 422
    assert raised.value.errors == [{"loc": ["body", "type"], "msg": "unknown task type"}]


async def test_a_time_window_goes_with_every_page(serve: Any) -> None:
    """The window is sent as the API reads it, the same instants (in UTC, to the
    microsecond, "+" nowhere), with the first page's request and the next one's."""
    after = datetime(2026, 12, 7, 11, 0, 0, 250_001, tzinfo=timezone(timedelta(hours=1)))
    before = datetime(2026, 12, 8, tzinfo=UTC)
    queries: list[dict[str, str]] = []

    async def listing(request: web.Request) -> web.Response:
        queries.append(dict(request.query))
        last = "cursor" in request.query
        return web.json_response({"items": [_task()], "next_cursor": None if last else "c1"})

    api = await serve({("GET", "/v1/tasks"): listing})
    async with Client(api, "lh_k", retry=NO_WAIT) as client:
        found = [t.id async for t in client.tasks(created_after=after, created_before=before)]
    assert found == [TASK_ID, TASK_ID]
    assert [q.pop("cursor", None) for q in queries] == [None, "c1"]
    assert (
        queries[0]
        == queries[1]
        == {
            "limit": "50",
            "created_after": "2026-12-07T10:00:00.250001Z",
            "created_before": "2026-12-08T00:00:00.000000Z",
        }
    )
    assert parse_rfc3339(queries[0]["created_after"]) == after


async def test_a_naive_datetime_is_refused_before_any_request(serve: Any) -> None:
    """A datetime without a timezone names no instant: the client does not guess."""
    calls = 0

    async def listing(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"items": [], "next_cursor": None})

    api = await serve({("GET", "/v1/tasks"): listing})
    async with Client(api, "lh_k", retry=NO_WAIT) as client:
        with pytest.raises(ValueError, match="created_before needs a timezone"):
            [t async for t in client.tasks(created_before=datetime(2026, 12, 7, 10))]
    assert calls == 0


async def test_a_dropped_stream_resumes_after_the_last_event_and_ends_at_the_terminal(
    serve: Any,
) -> None:
    """The stream breaks after seq 2 (no terminal event): the client reconnects with
    Last-Event-ID 2 and gets 3. A task token that expired (401) is replaced."""
    seen_ids: list[str | None] = []
    tokens: list[str] = []
    issued = 0

    async def token(request: web.Request) -> web.Response:
        nonlocal issued
        issued += 1
        assert await request.json() == {"task_id": str(TASK_ID)}
        return web.json_response({"token": f"t{issued}", "expires_at": "x"}, status=201)

    async def stream(request: web.Request) -> web.StreamResponse:
        seen_ids.append(request.headers.get("Last-Event-ID"))
        tokens.append(request.headers["Authorization"])
        if len(seen_ids) == 2:
            return web.Response(status=401)  # the first token has expired
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"retry: 10\n: longhaul\n\n")
        if len(seen_ids) == 1:
            await response.write(_event(1, "running") + _event(2, "running"))
            assert request.transport is not None
            request.transport.close()  # cut, no terminal event
            return response
        await response.write(_event(3, "succeeded"))
        await response.write_eof()
        return response

    api = await serve({("POST", "/v1/ws-tokens"): token})
    gateway = await serve({("GET", f"/v1/tasks/{TASK_ID}/events"): stream})
    async with Client(api, "lh_k", gateway_url=gateway, retry=NO_WAIT) as client:
        events = [e async for e in client.events(TASK_ID)]
    assert [(e.seq, e.state) for e in events] == [(1, "running"), (2, "running"), (3, "succeeded")]
    assert seen_ids == ["0", "2", "2"]
    assert tokens == ["Bearer t1", "Bearer t1", "Bearer t2"]


async def test_wait_on_an_ended_task_reads_no_stream(serve: Any) -> None:
    async def get(request: web.Request) -> web.Response:
        return web.json_response(_task(state="succeeded", last_seq=3))

    api = await serve({("GET", f"/v1/tasks/{TASK_ID}"): get})
    async with Client(api, "lh_k", retry=NO_WAIT) as client:
        task = await asyncio.wait_for(client.wait(TASK_ID), 10)
    assert task.state == "succeeded"


def test_a_client_can_be_made_outside_the_event_loop() -> None:
    """At import time, say: aiohttp's session (which wants a running loop) is made
    at first use."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client("http://127.0.0.1:1", "lh_k")


# ---------------------------------------------------------------- the synchronous client
# Its calls are made from threads (asyncio.to_thread), as a Django app's are, while this
# test's loop serves the fake servers.


def _held_stream(
    opened: asyncio.Event, ended: asyncio.Event, first: bytes = _event(1, "running")
) -> Route:
    """A gateway stream that sends ``first`` (seq 1, running) and then only keepalives,
    never the terminal event; ``ended`` once its client has gone."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        opened.set()
        try:
            while True:  # until a write fails, or aiohttp cancels this on the hang-up
                await asyncio.sleep(0.02)
                await response.write(b": keepalive\n\n")
        finally:
            ended.set()

    return stream


async def _token(request: web.Request) -> web.Response:
    return web.json_response({"token": "t", "expires_at": "x"}, status=201)


def test_the_sync_client_takes_the_clients_arguments() -> None:
    """The two cannot drift apart: every method has the same parameters (names, kinds,
    defaults), the constructor all but the session (an event loop's)."""

    def params(function: Callable[..., Any], leave_out: str = "") -> list[tuple[Any, ...]]:
        found = inspect.signature(function).parameters.values()
        return [(p.name, p.kind, p.default) for p in found if p.name != leave_out]

    assert params(SyncClient.__init__) == params(Client.__init__, leave_out="session")
    # Every public call of the async client: one added there and not here fails.
    calls = [
        name
        for name, member in vars(Client).items()
        if not name.startswith("_")
        and (inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member))
        and name != "aclose"
    ]
    assert {"submit", "tasks", "events", "wait", "create_schedule"} <= set(calls)
    for name in calls:
        assert hasattr(SyncClient, name), f"SyncClient lacks {name}"
        assert params(getattr(SyncClient, name)) == params(getattr(Client, name)), name


async def test_threads_submit_at_once_through_one_sync_client(serve: Any) -> None:
    """Sixteen threads' submissions are in flight together (the server answers none
    until all have arrived), each retried after a 503 with its own key, and each thread
    gets its own task back; one loop thread serves them all."""
    threads = 16
    tries: dict[str, int] = {}
    all_in = asyncio.Event()

    async def submit(request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        tries[key] = tries.get(key, 0) + 1
        if tries[key] == 1:
            return _problem(503)
        if sum(1 for n in tries.values() if n == 2) == threads:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), timeout(30))
        n = (await request.json())["args"]["n"]
        return web.json_response({**_task(), "id": str(UUID(int=n))}, status=202)

    api = await serve({("POST", "/v1/tasks"): submit})
    loop = asyncio.get_running_loop()
    with SyncClient(api, "lh_k", retry=NO_WAIT) as client, ThreadPoolExecutor(threads) as pool:
        calls = [
            loop.run_in_executor(pool, lambda n=n: client.submit("demo.sleep", {"n": n}))
            for n in range(threads)
        ]
        tasks = await asyncio.gather(*calls)
        loops = [t for t in threading.enumerate() if t.name == "longhaul-client"]
    assert [t.id for t in tasks] == [UUID(int=n) for n in range(threads)]
    assert len(tries) == threads and set(tries.values()) == {2}
    assert len(loops) == 1
    assert not loops[0].is_alive()  # close() stopped it


async def test_the_sync_clients_errors_and_pages_are_the_clients(serve: Any) -> None:
    """A problem is the same LonghaulError, an unkeyed write is not sent again after a
    lost answer, and tasks() reads page after page as a plain iterator."""
    retries = 0

    async def submit(request: web.Request) -> web.Response:
        return _problem(422, errors=[{"loc": ["body", "type"], "msg": "unknown task type"}])

    async def retry(request: web.Request) -> web.Response:
        nonlocal retries
        retries += 1
        return _problem(504, request_id="req-9")

    async def listing(request: web.Request) -> web.Response:
        first = "cursor" not in request.query
        assert request.query.get("cursor", "c1") == "c1" and request.query["state"] == "failed"
        return web.json_response(
            {"items": [_task(state="failed")], "next_cursor": "c1" if first else None}
        )

    api = await serve(
        {
            ("POST", "/v1/tasks"): submit,
            ("POST", "/v1/tasks/{id}/retry"): retry,
            ("GET", "/v1/tasks"): listing,
        }
    )
    with SyncClient(api, "lh_k", retry=NO_WAIT) as client:
        with pytest.raises(LonghaulError) as unknown:
            await asyncio.to_thread(client.submit, "nope")
        with pytest.raises(LonghaulError) as lost:
            await asyncio.to_thread(client.retry, TASK_ID)
        listed = await asyncio.to_thread(lambda: list(client.tasks(state="failed", page=1)))
    assert unknown.value.status == 422 and unknown.value.errors[0]["loc"] == ["body", "type"]
    assert (lost.value.status, lost.value.request_id, retries) == (504, "req-9", 1)
    assert [t.id for t in listed] == [TASK_ID, TASK_ID]


async def test_close_ends_the_events_iterators_of_other_threads(serve: Any) -> None:
    """One thread blocked reading an iterator (its stream has sent nothing yet) and
    another holding one at its first event: close() from a third ends both for loops
    as if the streams had ended, closes both streams, and later calls say it is closed."""
    reading, read_ended, held_ended = asyncio.Event(), asyncio.Event(), asyncio.Event()
    streams = [
        _held_stream(asyncio.Event(), held_ended),
        _held_stream(reading, read_ended, first=b""),
    ]

    async def stream(request: web.Request) -> web.StreamResponse:
        return await streams.pop(0)(request)

    api = await serve({("POST", "/v1/ws-tokens"): _token})
    gateway = await serve({("GET", f"/v1/tasks/{TASK_ID}/events"): stream})
    client = SyncClient(api, "lh_k", gateway_url=gateway, retry=NO_WAIT)
    held = await asyncio.to_thread(client.events, TASK_ID)
    assert (await asyncio.to_thread(next, held)).seq == 1
    reader = asyncio.ensure_future(asyncio.to_thread(lambda: list(client.events(TASK_ID))))
    await asyncio.wait_for(reading.wait(), timeout(10))  # the reader waits in next()
    await asyncio.to_thread(client.close)
    assert await asyncio.wait_for(reader, timeout(10)) == []
    assert await asyncio.to_thread(list, held) == []
    await asyncio.wait_for(asyncio.gather(read_ended.wait(), held_ended.wait()), timeout(10))
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.to_thread(client.get, TASK_ID)
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.to_thread(client.events, TASK_ID)


async def test_an_events_iterator_left_early_ends_its_stream_now(serve: Any) -> None:
    """close() on the iterator (a break, a `with closing(...)` left) releases the
    stream at once, and the client goes on serving."""
    opened, ended = asyncio.Event(), asyncio.Event()

    async def get(request: web.Request) -> web.Response:
        return web.json_response(_task(state="running"))

    api = await serve({("POST", "/v1/ws-tokens"): _token, ("GET", f"/v1/tasks/{TASK_ID}"): get})
    gateway = await serve({("GET", f"/v1/tasks/{TASK_ID}/events"): _held_stream(opened, ended)})
    with SyncClient(api, "lh_k", gateway_url=gateway, retry=NO_WAIT) as client:
        events = await asyncio.to_thread(client.events, TASK_ID)
        assert (await asyncio.to_thread(next, events)).seq == 1
        await asyncio.to_thread(events.close)
        await asyncio.wait_for(ended.wait(), timeout(10))
        assert (await asyncio.to_thread(client.get, TASK_ID)).state == "running"


async def test_a_sync_wait_given_up_ends_its_stream(serve: Any) -> None:
    """wait()'s timeout raises TimeoutError, as the Client's does, and the stream it
    was reading is closed: nothing goes on in the loop for a caller that left."""
    opened, ended = asyncio.Event(), asyncio.Event()

    async def get(request: web.Request) -> web.Response:
        return web.json_response(_task(state="running"))

    api = await serve({("POST", "/v1/ws-tokens"): _token, ("GET", f"/v1/tasks/{TASK_ID}"): get})
    gateway = await serve({("GET", f"/v1/tasks/{TASK_ID}/events"): _held_stream(opened, ended)})
    with SyncClient(api, "lh_k", gateway_url=gateway, retry=NO_WAIT) as client:
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(client.wait, TASK_ID, 0.5)
        await asyncio.wait_for(ended.wait(), timeout(10))
        assert (await asyncio.to_thread(client.get, TASK_ID)).state == "running"


async def test_a_sync_client_refuses_a_thread_running_an_event_loop(serve: Any) -> None:
    """Called here, in this test's loop, it raises at once instead of blocking the loop
    (which, in its own loop's thread, would be a deadlock); nothing is sent."""
    calls = 0

    async def get(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response(_task())

    api = await serve({("GET", f"/v1/tasks/{TASK_ID}"): get})
    client = SyncClient(api, "lh_k", retry=NO_WAIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine made and never awaited would warn
        with pytest.raises(RuntimeError, match="event loop"):
            client.get(TASK_ID)
        with pytest.raises(RuntimeError, match="event loop"):
            client.events(TASK_ID)
    assert (await asyncio.to_thread(client.get, TASK_ID)).id == TASK_ID
    client.close()  # brief: allowed here
    assert calls == 1


async def _python(script: str, *args: str) -> asyncio.subprocess.Process:
    """``script`` started in a Python of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


INTERRUPTED = """
import sys
from longhaul import SyncClient

api, gateway, task_id = sys.argv[1:]
client = SyncClient(api, "lh_k", gateway_url=gateway)
try:
    client.wait(task_id)
except KeyboardInterrupt:
    print("interrupted", flush=True)
print(client.get(task_id).state.value, flush=True)
events = client.events(task_id)
print(next(events).seq, flush=True)
# It exits here, without close(), an events() iterator at its first event.
"""


async def test_an_interrupted_caller_and_an_exit_without_close_leave_nothing_stuck(
    serve: Any,
) -> None:
    """Ctrl-C in a script blocked in wait() ends the stream the loop was reading (before
    the script's next stream, not at its exit), and the client still answers; exiting
    without close() then neither hangs nor prints."""
    opened, ended = asyncio.Event(), asyncio.Event()
    streams = [_held_stream(opened, ended), _held_stream(asyncio.Event(), asyncio.Event())]
    first_ended_before_second: list[bool] = []

    async def get(request: web.Request) -> web.Response:
        return web.json_response(_task(state="running"))

    async def stream(request: web.Request) -> web.StreamResponse:
        if len(streams) == 1:
            first_ended_before_second.append(ended.is_set())
        return await streams.pop(0)(request)

    api = await serve({("POST", "/v1/ws-tokens"): _token, ("GET", f"/v1/tasks/{TASK_ID}"): get})
    gateway = await serve({("GET", f"/v1/tasks/{TASK_ID}/events"): stream})
    proc = await _python(INTERRUPTED, api, gateway, str(TASK_ID))
    await asyncio.wait_for(opened.wait(), timeout(30))
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), timeout(60))
    assert first_ended_before_second == [True]
    assert (proc.returncode, out.decode().split(), err.decode()) == (
        0,
        ["interrupted", "running", "1"],
        "",
    )


FORKED = """
import os, sys
from longhaul import SyncClient

api, task_id = sys.argv[1:]
client = SyncClient(api, "lh_k")
client.get(task_id)
if os.fork() == 0:
    try:
        client.get(task_id)
    except RuntimeError as e:
        print("child:", e, flush=True)
else:
    os.wait()
    print("parent:", client.get(task_id).state.value, flush=True)
"""


async def test_a_sync_client_used_before_a_fork_refuses_the_child(serve: Any) -> None:
    """Its loop's thread stayed in the parent: the child's call raises, rather than
    wait for a loop that does not run there, and the child exits; the parent goes on."""

    async def get(request: web.Request) -> web.Response:
        return web.json_response(_task())

    api = await serve({("GET", f"/v1/tasks/{TASK_ID}"): get})
    proc = await _python(FORKED, api, str(TASK_ID))
    out, _ = await asyncio.wait_for(proc.communicate(), timeout(60))
    assert proc.returncode == 0
    assert out.decode().splitlines() == [
        "child: this SyncClient was first used before the fork: make one in each process",
        "parent: queued",
    ]
