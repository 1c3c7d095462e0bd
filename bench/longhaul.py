"""Scenarios 2 and 5: Longhaul end to end, and POST /v1/tasks under load.

The system: 1 API process, 2 worker processes (default concurrency 16 each), 1 gateway
process, as ``python -m services.<name>`` with default settings except the API's rate
limit (off) and the gateway's per-tenant connection cap (raised for scenario 4).

The load generator is this process: an aiohttp client and a pool of WebSocket
connections to the gateway. Per task it records:

* submit→202: the client's clock around the HTTP request; in the open loop, from when
  the request was due by the schedule, so the generator's own lateness counts;
* submit→running: ``tasks.started_at`` (PostgreSQL ``now()`` of the worker's claim,
  the same instant the ``running`` event carries), read once after the run;
* submit→terminal: when the terminal event frame arrived on the WebSocket client. The
  client subscribes after the 202 (ids are the server's), so a task that finished first
  arrives as a replay: that is what a real client sees."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from bench.infra import BenchEnv, CpuMeter, Proc, python, wait_http_ok
from bench.stats import latency_summary, series
from tests.support import free_port

TERMINAL = {"succeeded", "failed", "cancelled"}
# Requests in flight in the single-submit saturation run (the peers' client has as many
# publishes in flight).
SATURATION_INFLIGHT = 64
JSON = {"Content-Type": "application/json"}


@dataclass
class LonghaulSystem:
    env: BenchEnv
    workers: int = 2
    api_port: int = 0
    gateway_port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}/v1/ws"

    async def start(self) -> None:
        self.api_port, self.gateway_port = free_port(), free_port()
        # Workers first: they register the task types the API admits.
        for i in range(self.workers):
            port = free_port()
            proc = self.env.spawn(
                python("-m", "services.worker"),
                f"worker{i}",
                self.env.env(worker_metrics_port=str(port)),
            )
            self.procs[f"worker{i}"] = proc
            await wait_http_ok(f"http://127.0.0.1:{port}/readyz", proc)
        api = self.env.spawn(
            python("-m", "services.api"),
            "api",
            self.env.env(
                api_port=str(self.api_port),
                rate_limit_per_s="0",
                public_ws_url=self.ws_url,
            ),
        )
        self.procs["api"] = api
        await wait_http_ok(f"{self.api_url}/readyz", api)
        gw = self.env.spawn(
            python("-m", "services.ws_gateway"),
            "gateway",
            self.env.env(
                gateway_port=str(self.gateway_port),
                max_connections_per_tenant="20000",
                max_connections="20000",
            ),
        )
        self.procs["gateway"] = gw
        await wait_http_ok(f"http://127.0.0.1:{self.gateway_port}/readyz", gw)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.procs.clear()

    @property
    def worker_procs(self) -> list[Proc]:
        return [p for k, p in self.procs.items() if k.startswith("worker")]

    def meter(self) -> CpuMeter:
        services = {
            "api": self.procs["api"],
            "gateway": self.procs["gateway"],
            **{k: p for k, p in self.procs.items() if k.startswith("worker")},
        }
        return CpuMeter(services)


@dataclass
class Rec:
    submit: float
    accepted: float = 0.0
    terminal: float = 0.0


class Tracker:
    """WebSocket connections to the gateway that watch submitted tasks until terminal.
    A connection the gateway closes is reopened and its pending tasks resubscribed."""

    def __init__(self, system: LonghaulSystem, http: aiohttp.ClientSession, conns: int) -> None:
        self._system = system
        self._http = http
        self._n = conns
        self._conns: list[ClientConnection | None] = [None] * conns
        self._pending: list[set[str]] = [set() for _ in range(conns)]
        self._readers: list[asyncio.Task[None]] = []
        self._locks = [asyncio.Lock() for _ in range(conns)]
        self.recs: dict[str, Rec] = {}
        self.reconnects = 0
        self.errors: dict[str, int] = {}
        # Tracked tasks whose subscription the gateway refused (the code): they will
        # never be seen to end here, so the wait for all of them ends at the first.
        self.refused: dict[str, str] = {}
        self.all_done = asyncio.Event()
        self.expected = 0
        self.done = 0

    async def _token(self) -> str:
        async with self._http.post(
            f"{self._system.api_url}/v1/ws-tokens",
            headers={"Authorization": f"Bearer {self._system.env.api_key}"},
        ) as r:
            body = await r.json()
            return str(body["token"])

    async def _open(self, i: int) -> ClientConnection:
        token = await self._token()
        conn = await connect(
            f"{self._system.ws_url}?token={token}",
            open_timeout=30,
            max_size=2**20,
            compression=None,
        )
        self._conns[i] = conn
        return conn

    async def start(self) -> None:
        for i in range(self._n):
            await self._open(i)
            self._readers.append(asyncio.create_task(self._read(i), name=f"ws-reader-{i}"))

    async def close(self) -> None:
        for r in self._readers:
            r.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for c in self._conns:
            if c is not None:
                c.transport.abort()

    def _slot(self, task_id: str) -> int:
        return zlib.crc32(task_id.encode()) % self._n

    async def track(self, task_id: str, rec: Rec) -> None:
        self.recs[task_id] = rec
        i = self._slot(task_id)
        self._pending[i].add(task_id)
        conn = self._conns[i]
        if conn is not None:
            with contextlib.suppress(ConnectionClosed):
                await conn.send(_sub(task_id))

    def check(self) -> None:
        """Raise if the gateway refused a subscription: the run cannot measure what it
        claims (a connection holds at most 1,000 subscriptions by default: more tasks
        outstanding at once than 1,000 per tracker connection hit that cap)."""
        if self.refused:
            codes = sorted(set(self.refused.values()))
            raise RuntimeError(
                f"the gateway refused {len(self.refused)} subscriptions ({', '.join(codes)})"
            )

    async def _read(self, i: int) -> None:
        for _ in range(1000):  # bounded reconnects
            conn = self._conns[i]
            assert conn is not None
            try:
                async for frame in conn:
                    now = time.time()
                    msg = orjson.loads(frame)
                    kind = msg.get("type")
                    if kind == "error":
                        code = str(msg.get("code"))
                        self.errors[code] = self.errors.get(code, 0) + 1
                        refused = msg.get("task_id")
                        if refused in self.recs and not self.recs[refused].terminal:
                            self.refused[refused] = code
                            self.all_done.set()
                        continue
                    if kind != "event" or msg.get("state") not in TERMINAL:
                        continue
                    tid = msg["task_id"]
                    rec = self.recs.get(tid)
                    if rec is None or rec.terminal:
                        continue
                    rec.terminal = now
                    self._pending[i].discard(tid)
                    self.done += 1
                    if self.done >= self.expected:
                        self.all_done.set()
                    with contextlib.suppress(ConnectionClosed):
                        await conn.send(
                            orjson.dumps({"op": "unsubscribe", "task_id": tid}).decode()
                        )
            except (ConnectionClosed, WebSocketException, OSError):
                pass
            # Closed by the gateway (slow consumer, most likely): reopen and resubscribe.
            self.reconnects += 1
            self._conns[i] = None
            try:
                conn = await self._open(i)
            except (OSError, TimeoutError, WebSocketException, aiohttp.ClientError):
                await asyncio.sleep(0.5)
                continue
            for tid in list(self._pending[i]):
                with contextlib.suppress(ConnectionClosed):
                    await conn.send(_sub(tid))


def _sub(task_id: str) -> str:
    return orjson.dumps({"op": "subscribe", "task_id": task_id, "after_seq": 0}).decode()


async def _one_run(
    system: LonghaulSystem,
    *,
    n: int,
    mode: str,
    rate: float | None = None,
    concurrency: int = 64,
    batch: int = 1,
    ws_conns: int = 32,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Submit ``n`` demo.noop tasks (``batch`` per request), open loop at ``rate``
    tasks/s, or closed loop with ``concurrency`` requests in flight (rate None)."""
    env = system.env
    headers = {"Authorization": f"Bearer {env.api_key}", **JSON}
    connector = aiohttp.TCPConnector(limit=max(concurrency, 512))
    http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
    tracker = Tracker(system, http, ws_conns)
    try:
        await tracker.start()
        tracker.expected = n
        statuses: dict[int, int] = {}
        url = f"{system.api_url}/v1/tasks" if batch == 1 else f"{system.api_url}/v1/tasks:batch"
        body = (
            orjson.dumps({"type": "demo.noop"})
            if batch == 1
            else orjson.dumps({"tasks": [{"type": "demo.noop"}] * batch})
        )
        requests = n // batch
        late = 0
        meter = system.meter()

        async def submit(t: float) -> None:
            # t: when the request was due, the closed loop's now or the open loop's
            # schedule; what the generator was late by counts in every latency.
            try:
                async with http.post(url, data=body, headers=headers) as r:
                    data = await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status = -1
            now = time.time()
            statuses[status] = statuses.get(status, 0) + 1
            if status != 202:
                return
            parsed = orjson.loads(data)
            for task in parsed["tasks"] if batch > 1 else [parsed]:
                await tracker.track(task["id"], Rec(submit=t, accepted=now))

        meter.start()
        t0 = time.time()
        if rate is None:
            counter = iter(range(requests))

            async def lane() -> None:
                for _ in counter:
                    await submit(time.time())

            await asyncio.gather(*(lane() for _ in range(concurrency)))
        else:
            late = await open_loop(submit, requests=requests, interval=batch / rate, t0=t0)
        t_sub_end = time.time()
        accepted = len(tracker.recs)
        tracker.expected = accepted
        if tracker.done >= accepted:
            tracker.all_done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tracker.all_done.wait(), timeout_s)
        tracker.check()
        cpu = meter.stop()
    finally:
        # Also when a run fails: the next one starts clean.
        await tracker.close()
        await http.close()

    recs = tracker.recs
    pool = await asyncpg.connect(env.database_url)
    try:
        rows = await pool.fetch(
            "SELECT id, created_at, started_at, finished_at, state FROM tasks"
            " WHERE id = ANY($1::uuid[])",
            [uuid.UUID(k) for k in recs],
        )
    finally:
        await pool.close()
    started = {str(r["id"]): r["started_at"] for r in rows}
    created = {str(r["id"]): r["created_at"] for r in rows}
    succeeded = sum(1 for r in rows if r["state"] == "succeeded")
    done = [r for r in recs.values() if r.terminal]
    t_last = max((r.terminal for r in done), default=t_sub_end)
    last_accept = max((r.accepted for r in recs.values()), default=t_sub_end)
    return {
        "offered_per_s": rate,
        "requests": requests,
        "statuses": {str(k): v for k, v in statuses.items()},
        # Not 202 (-1: no response: a client error or timeout). Their latencies are not
        # in the figures below, so a latency target is not met in a run that has any.
        "failed_requests": requests - statuses.get(202, 0),
        "accepted": accepted,
        "terminal_seen": len(done),
        "succeeded_in_db": succeeded,
        "accepted_per_s": round(accepted / max(1e-9, last_accept - t0), 1),
        "completed_per_s": round(len(done) / max(1e-9, t_last - t0), 1),
        "late_sends": late,
        "ws_reconnects": tracker.reconnects,
        "ws_errors": tracker.errors,
        "submit_to_202_ms": latency_summary([r.accepted - r.submit for r in recs.values()]),
        "submit_to_running_ms": latency_summary(
            [started[k].timestamp() - r.submit for k, r in recs.items() if started.get(k)]
        ),
        "submit_to_terminal_ws_ms": latency_summary([r.terminal - r.submit for r in done]),
        # The running latency's two parts: the client to the insert (the request and the
        # group commit), and the insert to the claim (relay, broker, worker).
        "submit_to_insert_ms": latency_summary(
            [created[k].timestamp() - r.submit for k, r in recs.items() if created.get(k)]
        ),
        "insert_to_running_ms": latency_summary(
            [(started[k] - created[k]).total_seconds() for k in recs if started.get(k)]
        ),
        **cpu,
    }


async def open_loop(
    submit: Callable[[float], Coroutine[Any, Any, None]],
    *,
    requests: int,
    interval: float,
    t0: float,
    cap: int = 2000,
) -> int:
    """Start request i at ``t0 + i * interval`` as ``submit(t0 + i * interval)``, not
    waiting for earlier ones (at most ``cap`` in flight), and wait for all of them.

    The submit time a request is timed from is when it was due, not when the generator
    got to it: on a busy machine the generator falls behind, and timing from the late
    start would leave that delay out of the latencies (coordinated omission). Returns
    how many requests started over 50 ms late."""
    inflight: set[asyncio.Task[None]] = set()
    late = 0
    for i in range(requests):
        due = t0 + i * interval
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.05:
            late += 1
        while len(inflight) >= cap:  # bounded: the generator never runs away
            await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(submit(due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.wait(inflight)
    return late


def saturation_configs(*, n: int, batch: int) -> dict[str, str]:
    """The saturation runs' descriptions, by name."""
    return {
        "single_saturation": f"POST /v1/tasks, 1 task per request, closed loop with "
        f"{SATURATION_INFLIGHT} requests in flight; N={n}",
        "batch_saturation": f"POST /v1/tasks:batch of {batch}, closed loop with 4 batches in "
        f"flight; N={n}",
    }


def warm_up_size(n: int) -> int:
    """Tasks run, unmeasured, by a system or peer just started, before its measured
    run: connections, prepared statements and caches are then as in service."""
    return min(500, max(50, n // 20))


async def warm_up(system: LonghaulSystem, *, n: int, timeout_s: float) -> None:
    await _one_run(system, n=warm_up_size(n), mode="single", concurrency=64, timeout_s=timeout_s)


async def saturation_round(
    system: LonghaulSystem, *, n: int, batch: int, timeout_s: float
) -> dict[str, dict[str, Any]]:
    """One run of each saturation scenario: the figures the peers' and the ceiling's
    are compared with, so they are measured in the same round as those."""
    return {
        "single_saturation": await _one_run(
            system, n=n, mode="single", concurrency=SATURATION_INFLIGHT, timeout_s=timeout_s
        ),
        "batch_saturation": await _one_run(
            system, n=n, mode="batch", batch=batch, concurrency=4, timeout_s=timeout_s
        ),
    }


async def half_rates(
    system: LonghaulSystem,
    saturation: dict[str, Any],
    *,
    n: int,
    runs: int,
    batch: int,
    max_rate_run_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    """The open-loop runs at half the saturation rates (``saturation``: the series of
    the saturation runs, by name), on a system that first runs the warm-up the
    saturation runs get: it was just started too."""
    await warm_up(system, n=n, timeout_s=timeout_s)
    rate = max(10.0, round(_sustainable(saturation["single_saturation"]["summary"]) / 2, 1))
    n_rate = min(n, max(100, int(rate * max_rate_run_s)))
    brate = max(batch * 1.0, round(_sustainable(saturation["batch_saturation"]["summary"]) / 2, 1))
    n_brate = min(n, max(batch, int(brate * max_rate_run_s) // batch * batch))
    single = [
        await _one_run(system, n=n_rate, mode="single", rate=rate, timeout_s=timeout_s)
        for _ in range(runs)
    ]
    batches = [
        await _one_run(
            system, n=n_brate, mode="batch", batch=batch, rate=brate, timeout_s=timeout_s
        )
        for _ in range(runs)
    ]
    return {
        "single_half_rate": series(
            f"POST /v1/tasks, open loop at {rate}/s = 50% of the saturation rate "
            f"(min of accepted/s and completed/s at saturation); N={n_rate}",
            single,
        ),
        "batch_half_rate": series(
            f"POST /v1/tasks:batch of {batch}, open loop at {brate} tasks/s = 50% of the "
            f"batch saturation rate; N={n_brate}",
            batches,
        ),
        "half_rate_single_per_s": rate,
    }


def _sustainable(summary: dict[str, Any]) -> float:
    acc = summary.get("accepted_per_s", {}).get("median") or 0.0
    comp = summary.get("completed_per_s", {}).get("median") or 0.0
    return float(min(acc, comp) if comp else acc)
