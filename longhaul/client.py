"""A Python client of Longhaul for the backends that hand it work: submit, follow a
task's progress, wait for its result, cancel, retry; and schedules, which make tasks
periodically.

It retries what is safe to retry, and nothing else:
- a refusal that says nothing was done (``429``, ``503``, both with ``Retry-After``),
  whatever the request;
- a lost answer (the connection dropped, a ``502``/``504``: the outcome unknown) only
  for reads, submissions and changes of a schedule. Every submission carries an
  ``Idempotency-Key``, so a second attempt answers the task the first one stored, or
  stores it once; a change says what to set, so twice is once.

Progress comes from the gateway's Server-Sent Events stream with a task token, which
is resumed from the last seq after a dropped connection: no event is missed or seen
twice."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import aiohttp

from longhaul.sse import Parser
from shared.backoff import Backoff
from shared.schemas import ProgressEvent, Schedule, Task, TaskState

_LOST = frozenset({502, 504})  # an upstream broke: the request may have been done
_REFUSED = frozenset({429, 503})  # the server says it did nothing: retry when told


class LonghaulError(Exception):
    """A request the API answered with an error (RFC 9457 problem JSON), or one given up
    on. ``status`` is None when no answer came at all."""

    def __init__(self, status: int | None, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.type: str = problem.get("type", "about:blank")
        self.title: str = problem.get("title", "")
        self.detail: str | None = problem.get("detail")
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        # What the API's log lines for the request carry: quote it when reporting.
        self.request_id: str | None = problem.get("request_id")
        super().__init__(f"{status} {self.title}: {self.detail}" if status else self.title)


@dataclass(frozen=True)
class RetryPolicy:
    # Tries per request, the first included.
    attempts: int = 5
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=0.5, factor=2.0, cap_s=10.0))
    # A Retry-After longer than this is waited for this long only.
    max_retry_after_s: float = 60.0


def retry_delay(
    policy: RetryPolicy,
    tries: int,
    status: int | None,
    retry_after: str | None,
    *,
    safe_if_lost: bool,
) -> float | None:
    """Seconds to wait before trying again after ``tries`` tries, or None to give up.
    ``status`` None: no answer came. Pure."""
    if tries >= policy.attempts:
        return None
    if status not in _REFUSED and not ((status is None or status in _LOST) and safe_if_lost):
        return None
    if retry_after is not None and retry_after.isascii() and retry_after.isdigit():
        return min(float(retry_after), policy.max_retry_after_s)
    return policy.backoff.delay(tries)


def _rfc3339(name: str, value: datetime) -> str:
    """``value`` in UTC to the microsecond, as the API reads it: a "Z", not "+00:00"
    (a "+" in a query string reads as a space unless encoded)."""
    if value.utcoffset() is None:
        raise ValueError(f"{name} needs a timezone (a naive datetime names no instant)")
    return value.astimezone(UTC).isoformat(timespec="microseconds").removesuffix("+00:00") + "Z"


def stream_base(events_link: str) -> str:
    """The gateway's HTTP base from a Task's ``links.events`` (its WebSocket URL). Pure."""
    parts = urlsplit(events_link)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class Client:
    """One per application, shared by its requests (it holds a connection pool).

    ``api_url``: the API's base, ``http://127.0.0.1:8000``. ``gateway_url``: the
    gateway's HTTP base for progress; by default the one each Task's links name."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        gateway_url: str | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        stream_read_timeout_s: float = 60.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._api = api_url.rstrip("/")
        self._gateway = gateway_url.rstrip("/") if gateway_url else None
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._retry = retry or RetryPolicy()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # A stream is long: only a silence longer than a few of the gateway's keepalive
        # comments (15 s by default) means it is gone.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout_s, sock_read=stream_read_timeout_s
        )
        # Made at first use, inside the event loop (aiohttp's rule), unless given.
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    # ------------------------------------------------------------ tasks

    async def submit(
        self,
        type: str,
        args: Mapping[str, Any] | None = None,
        *,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        delay_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Submit one task; its Task once accepted. With your own ``idempotency_key``
        (a request id of yours, say), a repeat of this call after a crash of yours
        answers the same task; without one, each call makes its own."""
        body = _request_body(type, args, priority, max_attempts, timeout_s, delay_s)
        doc = await self._call("POST", "/v1/tasks", body, key=idempotency_key or _new_key())
        return Task.model_validate(doc)

    async def submit_batch(
        self, tasks: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> list[Task]:
        """Submit 1..1000 task requests (``{"type": ..., "args": ...}`` each), all or
        none; their Tasks in the same order."""
        body = {"tasks": list(tasks)}
        doc = await self._call("POST", "/v1/tasks:batch", body, key=idempotency_key or _new_key())
        return [Task.model_validate(t) for t in doc["tasks"]]

    async def get(self, task_id: UUID | str) -> Task:
        return Task.model_validate(await self._call("GET", f"/v1/tasks/{task_id}"))

    async def tasks(
        self,
        *,
        state: TaskState | str | None = None,
        type: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page: int = 50,
    ) -> AsyncGenerator[Task, None]:
        """The tenant's tasks, newest first, page by page as they are read; with
        ``created_after`` and ``created_before``, those created from the one (inclusive)
        to the other (exclusive). Each a datetime with a timezone: a naive one is a
        ValueError, not a guess at which zone it meant."""
        query = {"limit": str(page)}
        if state is not None:
            query["state"] = str(state.value if isinstance(state, TaskState) else state)
        if type is not None:
            query["type"] = type
        for name, value in (("created_after", created_after), ("created_before", created_before)):
            if value is not None:
                query[name] = _rfc3339(name, value)
        while True:
            doc = await self._call("GET", "/v1/tasks", params=query)
            for item in doc["items"]:
                yield Task.model_validate(item)
            if doc["next_cursor"] is None:
                return
            # The same filters, window included, with the cursor: the window's next page.
            query["cursor"] = doc["next_cursor"]

    async def cancel(self, task_id: UUID | str) -> Task:
        """Ask the task to stop; it becomes ``cancelled`` when it does. Not retried on a
        lost answer: ask again, a repeat of a cancel is harmless, and a ``409`` says
        the task has ended."""
        return Task.model_validate(await self._call("POST", f"/v1/tasks/{task_id}/cancel"))

    async def retry(self, task_id: UUID | str) -> Task:
        """Run a failed or cancelled task again. Not retried on a lost answer: a repeat
        would be a ``409`` (the task is queued again): ``get`` tells."""
        return Task.model_validate(await self._call("POST", f"/v1/tasks/{task_id}/retry"))

    # ------------------------------------------------------------ schedules

    async def create_schedule(
        self,
        name: str,
        cron: str,
        type: str,
        args: Mapping[str, Any] | None = None,
        *,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        enabled: bool = True,
    ) -> Schedule:
        """Make a task of ``type`` with ``args`` each time ``cron`` fires (five fields,
        UTC: ``"0 6 * * *"`` is every day at 06:00). ``name`` is unique among your
        schedules. Not retried on a lost answer: a repeat would be a ``409`` (the name
        taken by the first); ``schedules`` tells."""
        body: dict[str, Any] = {"name": name, "cron": cron, "type": type, "enabled": enabled}
        optional = {
            "args": None if args is None else dict(args),
            "priority": priority,
            "max_attempts": max_attempts,
            "timeout_s": timeout_s,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return Schedule.model_validate(await self._call("POST", "/v1/schedules", body))

    async def schedules(self, *, page: int = 50) -> AsyncGenerator[Schedule, None]:
        """Your schedules, newest first, page by page as they are read."""
        query = {"limit": str(page)}
        while True:
            doc = await self._call("GET", "/v1/schedules", params=query)
            for item in doc["items"]:
                yield Schedule.model_validate(item)
            if doc["next_cursor"] is None:
                return
            query["cursor"] = doc["next_cursor"]

    async def get_schedule(self, schedule_id: UUID | str) -> Schedule:
        return Schedule.model_validate(await self._call("GET", f"/v1/schedules/{schedule_id}"))

    async def update_schedule(
        self,
        schedule_id: UUID | str,
        *,
        enabled: bool | None = None,
        cron: str | None = None,
        args: Mapping[str, Any] | None = None,
    ) -> Schedule:
        """Change what is given, leave the rest. Enabled again, or given a new ``cron``,
        the schedule fires next at its first fire time after now. Retried on a lost
        answer: the same change twice is the change once."""
        body: dict[str, Any] = {}
        if enabled is not None:
            body["enabled"] = enabled
        if cron is not None:
            body["cron"] = cron
        if args is not None:
            body["args"] = dict(args)
        doc = await self._call("PATCH", f"/v1/schedules/{schedule_id}", body, safe_if_lost=True)
        return Schedule.model_validate(doc)

    async def delete_schedule(self, schedule_id: UUID | str) -> None:
        """It makes no more tasks; those it made go on. Not retried on a lost answer: a
        repeat would be a ``404``."""
        await self._call("DELETE", f"/v1/schedules/{schedule_id}")

    # ------------------------------------------------------------ progress

    async def events(
        self, task_id: UUID | str, after_seq: int = 0
    ) -> AsyncGenerator[ProgressEvent, None]:
        """The task's events after ``after_seq``, in order, live, until its terminal
        event (the last yielded). A dropped stream is resumed where it stopped; events
        no longer retained come as one ``snapshot`` event."""
        base = self._gateway or stream_base((await self.get(task_id)).links.events)
        async with contextlib.aclosing(self._stream(task_id, after_seq, base)) as stream:
            async for event in stream:
                yield event

    async def _stream(
        self, task_id: UUID | str, after_seq: int, base: str
    ) -> AsyncGenerator[ProgressEvent, None]:
        """``events`` from the gateway at ``base``."""
        url = f"{base}/v1/tasks/{task_id}/events"
        parser = Parser(str(after_seq))
        token: str | None = None
        tries = 0
        while True:
            if token is None:
                token = await self._task_token(task_id)
            status: int | None = None
            retry_after = None
            try:
                async with self._http().get(
                    url,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Accept": "text/event-stream",
                        "Last-Event-ID": parser.last_event_id,
                    },
                    timeout=self._stream_timeout,
                ) as r:
                    status, retry_after = r.status, r.headers.get("Retry-After")
                    if r.status == 204:  # the terminal event is behind us
                        return
                    if r.status == 200:
                        async for event in _read_events(r, parser):
                            tries = 0
                            yield event
                            if event.state.terminal:
                                return
                        status = None  # ended before the terminal event: resume
                    elif r.status == 401:  # the task token expired: a new one
                        token = None
                    elif r.status not in _REFUSED:
                        raise LonghaulError(r.status, await _problem(r))
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
                status = None
            tries += 1
            delay = retry_delay(self._retry, tries, status, retry_after, safe_if_lost=True)
            if status == 401 and tries < self._retry.attempts:
                delay = 0.0
            if delay is None:
                raise LonghaulError(status, {"title": f"the event stream of {task_id} broke"})
            if status is None and parser.retry_ms is not None:
                # A dropped stream: no sooner than the gateway asked (its ``retry:``).
                delay = max(delay, parser.retry_ms / 1000)
            await asyncio.sleep(delay)

    async def wait(self, task_id: UUID | str, timeout_s: float | None = None) -> Task:
        """The task once it has ended (succeeded, failed or cancelled), followed live.
        ``TimeoutError`` after ``timeout_s``; the task goes on."""
        async with asyncio.timeout(timeout_s):
            task = await self.get(task_id)
            if not task.state.terminal:
                # The task just read names its gateway: not read again for it.
                base = self._gateway or stream_base(task.links.events)
                async with contextlib.aclosing(self._stream(task_id, task.last_seq, base)) as s:
                    async for _ in s:
                        pass
                task = await self.get(task_id)
            return task

    async def _task_token(self, task_id: UUID | str) -> str:
        doc = await self._call("POST", "/v1/ws-tokens", {"task_id": str(task_id)})
        return str(doc["token"])

    # ------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        params: Mapping[str, str] | None = None,
        safe_if_lost: bool = False,
    ) -> Any:
        headers = dict(self._auth)
        if key is not None:
            headers["Idempotency-Key"] = key
        # A read or a keyed submission may be sent again when its answer was lost.
        safe_if_lost = safe_if_lost or method == "GET" or key is not None
        tries = 0
        while True:
            tries += 1
            status: int | None = None
            retry_after = None
            problem: Mapping[str, Any] = {"title": f"no answer to {method} {path}"}
            try:
                async with self._http().request(
                    method,
                    self._api + path,
                    json=body,
                    params=params,
                    headers=headers,
                    timeout=self._timeout,
                ) as r:
                    if r.status == 204:  # no content (a deletion)
                        return None
                    if r.status < 300:
                        return await r.json()
                    status, retry_after = r.status, r.headers.get("Retry-After")
                    problem = await _problem(r)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
                pass
            delay = retry_delay(self._retry, tries, status, retry_after, safe_if_lost=safe_if_lost)
            if delay is None:
                raise LonghaulError(status, problem)
            await asyncio.sleep(delay)


async def _read_events(
    response: aiohttp.ClientResponse, parser: Parser
) -> AsyncGenerator[ProgressEvent, None]:
    """The response's events, as the parser completes them. Lines are split here, not
    by aiohttp's readline, which refuses lines over its buffer (a large ``data``)."""
    pending = b""
    async for chunk in response.content.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            message = parser.feed(line.removesuffix(b"\r").decode())
            if message is not None:
                yield ProgressEvent.model_validate_json(message.data)


async def _problem(response: aiohttp.ClientResponse) -> Mapping[str, Any]:
    try:
        doc = await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        doc = None
    if isinstance(doc, dict):
        return doc
    return {"title": response.reason or str(response.status)}


def _request_body(
    type: str,
    args: Mapping[str, Any] | None,
    priority: int | None,
    max_attempts: int | None,
    timeout_s: float | None,
    delay_s: float | None,
) -> dict[str, Any]:
    """A task request with only what was given: the API (and the type) fill in the
    rest, and a repeat with the same key compares as the same request."""
    body: dict[str, Any] = {"type": type}
    optional = {
        "args": None if args is None else dict(args),
        "priority": priority,
        "max_attempts": max_attempts,
        "timeout_s": timeout_s,
        "delay_s": delay_s,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _new_key() -> str:
    return f"longhaul-py-{uuid.uuid4()}"
