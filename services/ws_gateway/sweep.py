"""Subscriptions left behind the database: the safety net under live delivery.

An event can miss both Redis paths, the stream and pub/sub: a worker killed between
its commit and its event write, Redis away at that moment (the writer's breaker drops
what it cannot write), a resync that ran before the write it waited for. The client
then waits for an event nobody will send, the terminal one included. So every
``check_s`` the rows of the tasks this process watches are read in one query, and a
client still below a seq the database already had at the previous check (it had a
whole period to arrive) catches up: from the stream if it holds the events, else from
the row as a snapshot.

A task that ended, with every subscriber holding its terminal event, is settled: only a
retry (``POST /retry``, a redrive) can bring it more events. Clients that watch many
finished tasks (a dashboard) would otherwise cost a read of each at every check. A
settled task is read again when one of its subscribers is no longer exactly at the seq
it settled at (a new one catching up, or one that got a retry's event live), and at
every ``SETTLED_EVERY``-th check: so an event of a retry that reached nobody is still
delivered, one check after that (up to ``SETTLED_EVERY + 1`` periods late).

``Lag`` is the pure part; ``Sweeper`` does the reading and the offering."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID

from services.ws_gateway.metrics import GatewayMetrics
from services.ws_gateway.registry import Registry
from services.ws_gateway.repository import Head
from services.ws_gateway.session import Behind
from shared.db import ANY_PG_ERROR
from shared.liveness import beat

log = logging.getLogger(__name__)

SETTLED_EVERY = 12  # a minute at the default check period


class Watcher(Protocol):
    def behind(self, task_id: UUID, seq: int) -> bool:
        """Whether this subscriber has not got ``seq`` of the task yet."""

    def offer(self, item: Behind) -> None: ...


class Rows(Protocol):
    async def heads(self, task_ids: Sequence[UUID]) -> dict[UUID, Head]:
        """The latest event seq of each of these tasks that still exists, and whether
        the task has ended."""


class Lag:
    """Which tasks' subscribers to look at: those whose row had, one check ago, a seq
    that may not have reached them. Pure."""

    def __init__(self) -> None:
        self._seen: dict[UUID, int] = {}

    def observe(self, last_seqs: Mapping[UUID, int]) -> dict[UUID, int]:
        """Take this check's rows; return, per task, the seq its subscribers should have
        by now (what the previous check saw). Tasks no longer read are forgotten."""
        due = {t: seq for t, seq in self._seen.items() if t in last_seqs and seq > 0}
        self._seen = dict(last_seqs)
        return due


class Sweeper:
    def __init__(
        self, registry: Registry[Any], rows: Rows, metrics: GatewayMetrics, check_s: float
    ) -> None:
        self._registry = registry
        self._rows = rows
        self._metrics = metrics
        self._check_s = check_s
        self._lag = Lag()
        self._settled: dict[UUID, int] = {}  # task: the seq it ended at
        self._checks = 0

    async def run(self) -> None:
        """Check every ``check_s`` until cancelled. A failed check waits for the next:
        this safety net must not come down with one bad read."""
        while True:
            await asyncio.sleep(self._check_s)
            beat()
            try:
                await self.check()
            except ANY_PG_ERROR as exc:
                log.debug("subscription check failed", extra={"error": repr(exc)})
            except Exception:
                log.exception("subscription check failed")

    async def check(self) -> int:
        """One check; returns how many subscriptions were sent to catch up."""
        self._checks += 1
        watched = self._registry.subscribed_tasks()
        if self._checks % SETTLED_EVERY == 0:
            self._settled.clear()
        else:
            self._unsettle()
        unsettled = [t for t in watched if t not in self._settled]
        heads = await self._rows.heads(unsettled) if unsettled else {}
        due = self._lag.observe({t: head.seq for t, head in heads.items()})
        behind: dict[Watcher, list[tuple[UUID, int]]] = {}
        for task_id, seq in due.items():
            watchers: tuple[Watcher, ...] = self._registry.listeners(task_id)
            for watcher in watchers:
                if watcher.behind(task_id, seq):
                    behind.setdefault(watcher, []).append((task_id, seq))
        for task_id, head in heads.items():
            if head.final and all(
                _holds(w, task_id, head.seq) for w in self._registry.listeners(task_id)
            ):
                self._settled[task_id] = head.seq
        for watcher, seqs in behind.items():
            watcher.offer(Behind(tuple(seqs)))
        sent = sum(len(seqs) for seqs in behind.values())
        if sent:
            self._metrics.sweep_rechecks.inc(sent)
            log.info("subscriptions behind the database sent to catch up", extra={"count": sent})
        return sent

    def _unsettle(self) -> None:
        """Forget settled tasks nobody watches any more, and those a subscriber is no
        longer exactly at the end of: read them again from this check on."""
        for task_id, seq in list(self._settled.items()):
            watchers: tuple[Watcher, ...] = self._registry.listeners(task_id)
            if not watchers or not all(_holds(w, task_id, seq) for w in watchers):
                del self._settled[task_id]


def _holds(watcher: Watcher, task_id: UUID, seq: int) -> bool:
    """Whether the subscriber was sent exactly up to ``seq``: not short of it, and not
    past it (a newer event came live, so the task is moving again)."""
    return not watcher.behind(task_id, seq) and watcher.behind(task_id, seq + 1)
