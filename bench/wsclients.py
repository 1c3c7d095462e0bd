"""WebSocket load: helper-process roles for scenario 4 (idle connections, subscribed
clients timing progress frames) and the raw ``websockets`` broadcast server that is the
fan-out ceiling. Clients of both servers run the same code."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from bench.child import cpu_self, say, sleep_until, stdin_line
from shared.schemas import format_ts

_SAMPLE = 50_000  # latency samples kept per process (reservoir); counts stay exact


def _url(base: str, token: str | None) -> str:
    return f"{base}?token={token}" if token else base


async def _open(url: str, sem: asyncio.Semaphore) -> ClientConnection | None:
    async with sem:
        for _ in range(3):
            try:
                return await connect(
                    url, open_timeout=30, max_size=2**20, compression=None, close_timeout=2
                )
            except (OSError, TimeoutError, InvalidStatus, WebSocketException):
                await asyncio.sleep(0.2)
    return None


async def _close_all(conns: list[ClientConnection]) -> None:
    for c in conns:
        c.transport.abort()  # the peer sees a dropped TCP connection; fast and bounded


async def idle_clients(a: dict[str, Any]) -> dict[str, Any]:
    """Open one connection per token and hold them idle until told to stop."""
    sem = asyncio.Semaphore(a.get("concurrency", 100))
    opened = await asyncio.gather(*(_open(_url(a["url"], t), sem) for t in a["tokens"]))
    conns = [c for c in opened if c is not None]
    say(f"READY {len(conns)} {len(opened) - len(conns)}")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stdin_line(), a.get("hold_s", 600))
    alive = sum(1 for c in conns if c.state.name == "OPEN")
    await _close_all(conns)
    return {"opened": len(conns), "failed": len(opened) - len(conns), "alive_at_end": alive}


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def fanout_clients(a: dict[str, Any]) -> dict[str, Any]:
    """Connect, subscribe, say READY, then count and time the event frames received
    inside the window the parent sends (``WINDOW t_start t_end``)."""
    sem = asyncio.Semaphore(a.get("concurrency", 100))
    specs = a["conns"]
    opened = await asyncio.gather(*(_open(_url(a["url"], s.get("token")), sem) for s in specs))
    window = [float("inf"), float("-inf")]
    counted = 0
    seen = 0
    lat: list[float] = []
    # Beside each sample: (task id, seq, receive time), for the parent to time the frame
    # from the worker's publish (publish_clock) rather than from the event's ts.
    keys: list[tuple[str, int, float]] = []
    n_lat = 0
    disconnects = 0

    async def reader(conn: ClientConnection) -> None:
        nonlocal counted, seen, n_lat, disconnects
        try:
            async for frame in conn:
                now = time.time()
                msg = orjson.loads(frame)
                if msg.get("type") != "event":
                    continue
                seen += 1
                if window[0] <= now <= window[1]:
                    counted += 1
                    ts = _ts(msg["ts"])
                    if ts >= window[0] - 0.5:  # live, not replayed from before the window
                        n_lat += 1
                        key = (msg.get("task_id", ""), msg["seq"], now)
                        if len(lat) < _SAMPLE:
                            lat.append(now - ts)
                            keys.append(key)
                        else:
                            j = random.randrange(n_lat)
                            if j < _SAMPLE:
                                lat[j] = now - ts
                                keys[j] = key
        except ConnectionClosed:
            disconnects += 1

    readers = []
    for conn, spec in zip(opened, specs, strict=True):
        if conn is None:
            continue
        for task_id in spec.get("subs", []):
            await conn.send(
                orjson.dumps({"op": "subscribe", "task_id": task_id, "after_seq": 0}).decode()
            )
        readers.append(asyncio.create_task(reader(conn)))
    conns = [c for c in opened if c is not None]
    say(f"READY {len(conns)} {len(opened) - len(conns)}")
    line = await asyncio.wait_for(stdin_line(), a.get("hold_s", 600))
    _, start, end = line.split()
    window[0], window[1] = float(start), float(end)
    await sleep_until(window[0])
    cpu0 = cpu_self()
    await sleep_until(window[1])
    window_cpu = cpu_self() - cpu0
    await asyncio.sleep(0.3)
    dropped = disconnects
    await _close_all(conns)
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    return {
        "connected": len(conns),
        "failed": len(opened) - len(conns),
        "events_in_window": counted,
        "events_seen": seen,
        "latency_samples": [round(x, 5) for x in lat],
        "latency_keys": keys,
        "latency_n": n_lat,
        "disconnects": dropped,
        "window_cpu_s": round(window_cpu, 3),
    }


async def publish_clock(a: dict[str, Any]) -> dict[str, Any]:
    """When each progress event of the run's tasks was published: this process
    subscribes to the event channels as the gateway does, so a PUBLISH reaches both at
    the same moment, and it does nothing else, so its clock is not late. Records
    (task id, seq, receive time) inside the window the parent sends."""
    redis = Redis.from_url(a["redis_url"])
    pubsub = redis.pubsub()
    await pubsub.psubscribe(a["pattern"])
    say("READY")
    _, start, end = (await stdin_line()).split()
    first, last = float(start) - 1.0, float(end) + 1.0
    seen: list[tuple[str, int, float]] = []
    while time.time() < last:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        now = time.time()
        if msg is None or now < first:
            continue
        event = orjson.loads(msg["data"])
        seen.append((event["task_id"], event["seq"], now))
    await pubsub.aclose()
    await redis.aclose()
    return {"published": seen}


async def raw_broadcast_server(a: dict[str, Any]) -> dict[str, Any]:
    """A plain ``websockets`` server that broadcasts event-shaped frames to every client,
    as fast as the clients drain them (paused while a client's write buffer is over
    ``high_water`` bytes), between ``WINDOW`` bounds the parent sends.

    The pause waits on the transports' flow control (``Connection.drain``), not on a
    polling sleep: on uvloop a sleep under 1 ms is no sleep, and the poll took a core
    from the clients. It never ends the window early; a wait longer than ``stall_s``
    is counted (``stalls``), and the parent holds such a run invalid."""
    conns: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        conns.add(ws)
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    high = a.get("high_water", 64 * 1024)
    stall_s = a.get("stall_s", 1.0)
    sent = 0
    seq = 0
    stalls = 0
    longest = 0.0
    waited = 0.0
    # write_limit (high, high): a connection is paused above `high` bytes buffered and
    # resumed at `high` or below, the bound the loop below waits for.
    async with serve(
        handler, "127.0.0.1", 0, compression=None, max_size=2**16, write_limit=(high, high)
    ) as server:
        port = server.sockets[0].getsockname()[1]
        say(f"PORT {port}")
        line = await asyncio.wait_for(stdin_line(), a.get("hold_s", 600))
        _, start, end = line.split()
        t_start, t_end = float(start), float(end)
        await sleep_until(t_start - 0.5)
        task_id = "00000000-0000-7000-8000-000000000000"
        while time.time() < t_end:
            seq += 1
            # The gateway's own frame shape and timestamp format (milliseconds).
            frame = orjson.dumps(
                {
                    "type": "event",
                    "task_id": task_id,
                    "seq": seq,
                    "state": "running",
                    "progress": 0.5,
                    "message": f"step {seq}",
                    "data": None,
                    "ts": format_ts(datetime.now(UTC)),
                    "attempt": 1,
                }
            ).decode()
            targets = list(conns)
            broadcast(targets, frame)
            sent += len(targets)
            # Back pressure: websockets.broadcast never waits, so we do, until every
            # paused client has drained, at most to the end of the window.
            paused = [c for c in targets if c.paused]
            if paused:
                t = time.monotonic()
                await _drained(paused, max(0.0, t_end - time.time()))
                took = time.monotonic() - t
                waited += took
                longest = max(longest, took)
                if took > stall_s:
                    stalls += 1
            await asyncio.sleep(0)
        say("DONE")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stdin_line(), 30)
    return {
        "frames_sent": sent,
        "broadcasts": seq,
        "drain_wait_s": round(waited, 3),
        "longest_drain_wait_s": round(longest, 3),
        "stalls": stalls,
    }


async def _drained(conns: list[ServerConnection], timeout: float) -> None:
    """Until every connection's write buffer is back under its limit (a connection that
    closes meanwhile counts as drained), or ``timeout`` seconds."""
    waits = [asyncio.ensure_future(c.drain()) for c in conns]
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for w in pending:
        w.cancel()
    # Retrieve the errors of connections lost while paused: nothing to do with them.
    await asyncio.gather(*waits, return_exceptions=True)
