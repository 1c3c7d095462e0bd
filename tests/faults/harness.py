"""The fault suite's harness: submit ledger tasks over HTTP, let the system settle, and
judge the outcome against DESIGN.md's promises 1-3.

Definitions (what each column of the summary table counts, per fault):

- **accepted**: tasks answered ``202`` by ``POST /v1/tasks`` (or ``:batch``). Only these
  are promised anything; a ``503`` during a fault is an honest refusal.
- **lost**: accepted tasks not in a terminal state after the settle window. Must be 0.
- **execution**: one run of the handler, i.e. one row in ``fault_ledger``. An attempt
  whose worker was killed mid-run still executed (its effect may have happened), and the
  task then continues as the *next* attempt: attempts are fenced (claim is a conditional
  UPDATE on ``attempts = n - 1``), so one attempt number is executed at most once.
- **duplicates**: ``(task_id, attempt)`` pairs executed more than once. This is promise
  2's "effects at most once per attempt"; a redelivered message must be absorbed, never
  run again. Must be 0.
- **phantoms**: executions of an attempt the database never handed out
  (``attempt > tasks.attempts``). Must be 0.
- **redeliveries**: attempts beyond the first (``sum(attempts - 1)``): work redone after
  a fault. Counted, never a failure: every accepted task must still *succeed*.
- **terminal events**: per task, the Redis stream holds at most one terminal event, and
  when it holds one it agrees with the database (the truth). A terminal event may be
  missing (a crash after the commit, Redis down): the gateway derives it from the
  database then, so missing ones are reported, not failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
from redis.asyncio import Redis

from shared.wire import Wire
from tests.support import ServiceProcess, System, timeout

TASK_TYPE = "fault.ledger"
WORKER_ARGS = ("--tasks", "tests.faults.ledger_tasks")
TERMINAL = ("succeeded", "failed", "cancelled")

# Every test runs with short leases so that reaping a dead worker's attempts is fast.
FAULT_ENV = {
    "LONGHAUL_LEASE_S": "3",
    "LONGHAUL_WORKER_CONCURRENCY": "4",
    "LONGHAUL_SHUTDOWN_GRACE_S": "1",
    "LONGHAUL_CANCEL_GRACE_S": "1",
    "LONGHAUL_RETRY_BASE_S": "0.2",
    "LONGHAUL_RETRY_CAP_S": "2",
    "LONGHAUL_IO_TIMEOUT_S": "3",
    "LONGHAUL_RATE_LIMIT_PER_S": "0",
}


@dataclass
class FaultResult:
    fault: str
    tasks: int
    lost: int
    duplicates: int
    redeliveries: int
    recover_s: float | None
    executions: int = 0
    failed: int = 0
    phantoms: int = 0
    refused: int = 0
    terminal_events_missing: int = 0
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def worker_id_of(proc: ServiceProcess) -> str:
    """What the worker's id starts with (a random part follows: services/worker/app.py)."""
    return f"{socket.gethostname()}:{proc.pid}:"


class FaultRun:
    """One test's system (api + workers as processes) and its view of the database."""

    def __init__(
        self,
        *,
        env: dict[str, str],
        ports: dict[str, str],
        api_key: str,
        pool: asyncpg.Pool,
        redis_url: str,
        namespace: str,
        http: aiohttp.ClientSession,
    ) -> None:
        self.system = System({**env, **FAULT_ENV}, ports)
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.pool = pool
        self.redis_url = redis_url
        self.wire = Wire(namespace)
        self.http = http
        self.refused: dict[int | str, int] = {}

    # ------------------------------------------------------------------ processes

    async def start_api(self, **extra: str) -> ServiceProcess:
        return await self.system.start_api(**extra)

    async def start_worker(self, **extra: str) -> ServiceProcess:
        return await self.system.start_worker(*WORKER_ARGS, **extra)

    def workers(self) -> list[ServiceProcess]:
        return [p for p in self.system.procs if p.name == "worker" and p.alive()]

    # ------------------------------------------------------------------ submitting

    def _body(self, sleep_s: float) -> dict[str, Any]:
        return {"type": TASK_TYPE, "args": {"sleep_s": sleep_s}, "max_attempts": 20}

    async def submit_one(
        self, sleep_s: float, within: float = 20.0
    ) -> tuple[int | str, UUID | None]:
        """POST one task; return (status, id if 202). A hang is a failure, not a status."""
        try:
            async with self.http.post(
                f"{self.system.api_url}/v1/tasks",
                json=self._body(sleep_s),
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=timeout(within)),
            ) as response:
                body = await response.json(content_type=None)
                if response.status == 202:
                    return 202, UUID(body["id"])
                return response.status, None
        except TimeoutError as exc:
            raise AssertionError(f"POST /v1/tasks hung for more than {within}s") from exc
        except aiohttp.ClientConnectionError:
            return "connection", None

    async def submit(self, n: int, sleep_s: float, concurrency: int = 8) -> list[UUID]:
        """Submit ``n`` tasks; return the ids answered 202 (the promises)."""
        gate = asyncio.Semaphore(concurrency)
        accepted: list[UUID] = []

        async def one() -> None:
            async with gate:
                status, task_id = await self.submit_one(sleep_s)
            if task_id is not None:
                accepted.append(task_id)
            else:
                self.refused[status] = self.refused.get(status, 0) + 1

        await asyncio.gather(*(one() for _ in range(n)))
        return accepted

    async def submit_batch(self, n: int, sleep_s: float) -> list[UUID]:
        async with self.http.post(
            f"{self.system.api_url}/v1/tasks:batch",
            json={"tasks": [self._body(sleep_s) for _ in range(n)]},
            headers=self.headers,
        ) as response:
            body = await response.json(content_type=None)
            assert response.status == 202, body
            return [UUID(t["id"]) for t in body["tasks"]]

    # ------------------------------------------------------------------ observing

    async def now(self) -> float:
        """The database's clock (epoch seconds): ledger timestamps use the same clock."""
        return float(await self.pool.fetchval("SELECT extract(epoch FROM clock_timestamp())"))

    async def pending(self, ids: Sequence[UUID]) -> int:
        done = await self.pool.fetchval(
            "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND state = ANY($2::text[])",
            list(ids),
            list(TERMINAL),
        )
        return len(ids) - int(done)

    async def executions(self, ids: Sequence[UUID]) -> int:
        return int(
            await self.pool.fetchval(
                "SELECT count(*) FROM fault_ledger WHERE task_id = ANY($1::uuid[])", list(ids)
            )
        )

    async def running_on(self, worker_id: str) -> dict[UUID, int]:
        """The tasks running on the worker whose id starts with ``worker_id``."""
        rows = await self.pool.fetch(
            "SELECT id, attempts FROM tasks WHERE state = 'running' AND starts_with(worker_id, $1)",
            worker_id,
        )
        return {r["id"]: r["attempts"] for r in rows}

    async def rerun_at(self, task_id: UUID, after_attempt: int) -> float | None:
        """When (DB clock) the task's next attempt began executing, if it has."""
        value = await self.pool.fetchval(
            "SELECT extract(epoch FROM min(ts)) FROM fault_ledger WHERE task_id = $1 AND attempt > $2",
            task_id,
            after_attempt,
        )
        return None if value is None else float(value)

    async def settle(self, ids: Sequence[UUID], within: float = 90.0) -> float:
        """Wait (bounded) until every accepted task is terminal; return the seconds it
        took. Never raises: what did not settle is reported as lost by ``judge``."""
        start = time.monotonic()
        deadline = start + timeout(within)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if await self.pending(ids) == 0:
                    break
            await asyncio.sleep(0.2)
        return time.monotonic() - start

    async def _terminal_events(self, ids: Iterable[UUID]) -> dict[UUID, list[tuple[int, str]]]:
        redis = Redis.from_url(self.redis_url)
        try:
            pipe = redis.pipeline(transaction=False)
            ids = list(ids)
            for task_id in ids:
                pipe.xrange(self.wire.event_stream(task_id))
            streams = await pipe.execute()
        finally:
            await redis.aclose()
        out: dict[UUID, list[tuple[int, str]]] = {}
        for task_id, entries in zip(ids, streams, strict=True):
            events = [json.loads(fields[b"e"]) for _, fields in entries]
            out[task_id] = [(e["seq"], e["state"]) for e in events]
        return out

    # ------------------------------------------------------------------ judging

    async def judge(
        self,
        fault: str,
        ids: Sequence[UUID],
        *,
        recover_s: float | None,
        check_events: bool = True,
        notes: str = "",
        **extra: Any,
    ) -> FaultResult:
        """Compute the verdict for ``ids`` and assert the promises hold."""
        rows = {
            r["id"]: r
            for r in await self.pool.fetch(
                "SELECT id, state, attempts, last_seq, error FROM tasks WHERE id = ANY($1::uuid[])",
                list(ids),
            )
        }
        ledger: dict[tuple[UUID, int], int] = {
            (r["task_id"], r["attempt"]): r["n"]
            for r in await self.pool.fetch(
                "SELECT task_id, attempt, count(*) AS n FROM fault_ledger "
                "WHERE task_id = ANY($1::uuid[]) GROUP BY 1, 2",
                list(ids),
            )
        }
        lost = [i for i in ids if i not in rows or rows[i]["state"] not in TERMINAL]
        failed = [i for i in ids if i in rows and rows[i]["state"] != "succeeded" and i not in lost]
        duplicates = [k for k, n in ledger.items() if n > 1]
        phantoms = [(t, a) for (t, a) in ledger if t in rows and a > rows[t]["attempts"]]
        # The committed attempt of a succeeded task must have executed (its effect is in
        # the ledger): otherwise the worker committed a success it never ran.
        unexecuted = [
            i
            for i in ids
            if i in rows
            and rows[i]["state"] == "succeeded"
            and (i, rows[i]["attempts"]) not in ledger
        ]
        redeliveries = sum(max(0, rows[i]["attempts"] - 1) for i in ids if i in rows)
        missing_terminal = 0
        event_problems: list[str] = []
        if check_events and ids:
            for task_id, events in (await self._terminal_events(ids)).items():
                seqs = [s for s, _ in events]
                if seqs != sorted(set(seqs)):
                    event_problems.append(f"{task_id}: seqs not increasing {seqs}")
                terminal = [(s, st) for s, st in events if st in TERMINAL]
                if len(terminal) > 1:
                    event_problems.append(f"{task_id}: {len(terminal)} terminal events {terminal}")
                elif not terminal:
                    missing_terminal += 1
                elif task_id in rows and terminal[0][1] != rows[task_id]["state"]:
                    event_problems.append(
                        f"{task_id}: terminal event {terminal[0]} but db {rows[task_id]['state']}"
                    )
                elif terminal and events[-1] != terminal[0]:
                    event_problems.append(f"{task_id}: events after the terminal one {events}")
        result = FaultResult(
            fault=fault,
            tasks=len(ids),
            lost=len(lost),
            duplicates=len(duplicates),
            redeliveries=redeliveries,
            recover_s=None if recover_s is None else round(recover_s, 2),
            executions=sum(ledger.values()),
            failed=len(failed),
            phantoms=len(phantoms),
            refused=sum(self.refused.values()),
            terminal_events_missing=missing_terminal,
            notes=notes,
            extra=extra,
        )
        self.result = result
        detail = {
            "lost": [(str(i), rows[i]["state"] if i in rows else "missing") for i in lost[:5]],
            "duplicates": [(str(t), a, ledger[(t, a)]) for t, a in duplicates[:5]],
            "phantoms": [(str(t), a) for t, a in phantoms[:5]],
            "failed": [(str(i), rows[i]["error"]) for i in failed[:3]],
            "unexecuted": [str(i) for i in unexecuted[:5]],
            "events": event_problems[:5],
        }
        assert ids, f"{fault}: no task was accepted; the test tested nothing"
        assert not lost, f"{fault}: {len(lost)} accepted tasks not terminal: {detail}"
        assert not duplicates, f"{fault}: an attempt executed twice: {detail}"
        assert not phantoms, f"{fault}: executions of attempts never claimed: {detail}"
        assert not unexecuted, f"{fault}: succeeded without executing: {detail}"
        assert not failed, f"{fault}: redelivered tasks must succeed, not fail: {detail}"
        assert not event_problems, f"{fault}: progress stream broken: {detail}"
        return result


def summarize_recoveries(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median_s": round(statistics.median(values), 2),
        "max_s": round(max(values), 2),
        "n": len(values),
    }
