"""An insert whose reply is lost, against the real PostgreSQL: through a TCP proxy that,
armed, either lets the statement through and cuts the connection as the answer starts
(the INSERT commits, the API never hears it) or swallows the statement (it never
reaches the server). The API must then report what happened, not guess: accepted in
the first case, the error (a 503) in the second."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import pytest

from services.api.repository import ApiRepository, NewTask, OutcomeUnknown
from shared.db import TRANSIENT_ERRORS, create_pool
from shared.ids import uuid7
from shared.relay import Handed
from shared.schemas import TaskRequest
from tests.conftest import Deployment, Tenant

Mode = Literal["lose_reply", "hold_request"]


class Proxy:
    """Forwards TCP between the pool and PostgreSQL. ``arm(mode)``: the next connection
    the client writes on becomes the victim; ``lose_reply`` forwards its bytes and
    closes it when the server starts answering, ``hold_request`` holds what its client
    sends from then on, and delivers it on ``release()``, late, as a slow network may
    (then ``delivered`` is set). Other connections pass untouched."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._armed: Mode | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.fired = asyncio.Event()
        self._release = asyncio.Event()
        self.delivered = asyncio.Event()
        # Once fired, new connections are closed at once: PostgreSQL "down".
        self.down_after_firing = False

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def arm(self, mode: Mode) -> None:
        self._armed = mode

    def release(self) -> None:
        self._release.set()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self.down_after_firing and self.fired.is_set():
            c_writer.close()
            return
        s_reader, s_writer = await asyncio.open_connection(*self._target)
        victim: list[Mode] = []  # this connection's fate, once chosen
        held: list[bytes] = []

        def close() -> None:
            c_writer.close()
            s_writer.close()

        async def upstream() -> None:
            while data := await c_reader.read(65536):
                if not victim and self._armed is not None:
                    victim.append(self._armed)
                    self._armed = None
                    self.fired.set()
                if victim == ["hold_request"]:
                    held.append(data)
                    continue
                s_writer.write(data)
                await s_writer.drain()

        async def downstream() -> None:
            while data := await s_reader.read(65536):
                if victim == ["lose_reply"]:
                    close()  # the statement ran; its answer never arrives
                    return
                c_writer.write(data)
                await c_writer.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        # A held connection ends at its release too, its client still there or not.
        pumps.append(asyncio.create_task(self._release.wait()))
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            self._tasks.difference_update(pumps)
            c_writer.close()
            if victim == ["hold_request"]:
                await self._deliver_late(held, s_reader, s_writer)
            s_writer.close()

    async def _deliver_late(
        self, held: list[bytes], s_reader: asyncio.StreamReader, s_writer: asyncio.StreamWriter
    ) -> None:
        """The held bytes to the server, then end of input; done when the server is."""
        await self._release.wait()
        with contextlib.suppress(OSError):
            s_writer.write(b"".join(held))
            await s_writer.drain()
            s_writer.write_eof()
            while await s_reader.read(65536):
                pass
        self.delivered.set()


@pytest.fixture
async def proxy_pool(deployment: Deployment) -> AsyncIterator[tuple[Proxy, asyncpg.Pool]]:
    parts = urlsplit(deployment.database_url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = await proxy.start()
    netloc = parts.netloc.rsplit("@", 1)
    user = f"{netloc[0]}@" if len(netloc) == 2 else ""
    url = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))
    # One connection to start with, so the warm-up's prepared statement is the one the
    # armed insert uses (else the cut might fall on its Parse, before it ran).
    pool = await create_pool(url, min_size=1, max_size=3, timeout=2.0)
    try:
        yield proxy, pool
    finally:
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await asyncio.wait_for(pool.close(), 10)
        await proxy.aclose()


def _task() -> NewTask:
    return NewTask(id=uuid7(), request=TaskRequest(type="lost.reply"))


async def _stored(db: asyncpg.Pool, ids: list[UUID]) -> tuple[list[UUID], list[UUID]]:
    tasks = await db.fetch("SELECT id FROM tasks WHERE id = ANY($1::uuid[])", ids)
    boxes = await db.fetch("SELECT task_id FROM outbox WHERE task_id = ANY($1::uuid[])", ids)
    return sorted(r["id"] for r in tasks), sorted(r["task_id"] for r in boxes)


async def test_a_committed_insert_whose_reply_is_lost_is_reported_accepted(
    proxy_pool: tuple[Proxy, asyncpg.Pool], db: asyncpg.Pool, tenant: Tenant
) -> None:
    """Two requests sharing one group commit: both get their rows, each task is stored
    once with its outbox row, and neither is handed to the relay: their claims are
    released for any relay's next poll."""
    proxy, pool = proxy_pool
    handed: list[Handed] = []
    repo = ApiRepository(pool, timeout=5, hand_over=handed.extend, claim_s=30)
    await repo.insert(tenant.id, [_task()])  # warm-up: the statement prepared
    handed.clear()

    a, b = _task(), _task()
    proxy.arm("lose_reply")
    rows_a, rows_b = await asyncio.gather(repo.insert(tenant.id, [a]), repo.insert(tenant.id, [b]))

    assert proxy.fired.is_set()
    assert [r["id"] for r in rows_a] == [a.id]
    assert [r["id"] for r in rows_b] == [b.id]
    assert rows_a[0]["state"] == "queued" and rows_a[0]["tenant_id"] == tenant.id
    ids = sorted([a.id, b.id])
    assert await _stored(db, ids) == (ids, ids)
    assert handed == []
    # Released for the next poll of any relay, not left claimed for claim_s.
    claims = await db.fetch("SELECT claimed_until FROM outbox WHERE task_id = ANY($1::uuid[])", ids)
    assert [c["claimed_until"] for c in claims] == [None, None]
    await repo.aclose()


async def test_a_statement_held_up_on_the_way_raises_and_never_commits(
    proxy_pool: tuple[Proxy, asyncpg.Pool], db: asyncpg.Pool, tenant: Tenant
) -> None:
    """The statement has not reached the server when the API gives up on it (a 503):
    the answer stays the error, and stays true when the statement arrives after all,
    because the backend it was sent to was ended first."""
    proxy, pool = proxy_pool
    repo = ApiRepository(pool, timeout=5)
    await repo.insert(tenant.id, [_task()])

    task = _task()
    proxy.arm("hold_request")
    with pytest.raises(TRANSIENT_ERRORS):
        await repo.insert(tenant.id, [task])
    assert proxy.fired.is_set()
    proxy.release()
    await asyncio.wait_for(proxy.delivered.wait(), 30)

    assert await _stored(db, [task.id]) == ([], [])
    await repo.aclose()


async def test_a_lost_reply_that_cannot_be_checked_is_an_unknown_outcome(
    proxy_pool: tuple[Proxy, asyncpg.Pool], db: asyncpg.Pool, tenant: Tenant
) -> None:
    """PostgreSQL unreachable after the reply was lost: neither accepted nor refused,
    OutcomeUnknown (a 504 outcome-unknown, never the 503 that means "not accepted"). The
    task was stored all the same."""
    proxy, pool = proxy_pool
    repo = ApiRepository(pool, timeout=5)
    await repo.insert(tenant.id, [_task()])

    task = _task()
    proxy.down_after_firing = True
    proxy.arm("lose_reply")
    with pytest.raises(OutcomeUnknown):
        await repo.insert(tenant.id, [task])

    assert await _stored(db, [task.id]) == ([task.id], [task.id])
    await repo.aclose()
