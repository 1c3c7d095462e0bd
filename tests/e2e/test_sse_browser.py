"""The SSE fallback as browsers use it: a standard EventSource in a real headless
Chromium, on the API's page, following a task run by a real worker through a real
gateway. With a single-use token, one connection from the first event to the terminal
one (an EventSource that had to reconnect would come back with its spent token, get
401 and stop); with a task token, across a restart of the gateway, by the browser's
own reconnect."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page

from tests.conftest import Tenant
from tests.e2e.test_browser import browser  # noqa: F401 - the fixture
from tests.support import System, eventually, timeout

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# Resolves with what the EventSource saw once a terminal event arrives, or with what it
# had when the connection was given up (readyState CLOSED) or the time ran out. What it
# has so far is in window.seen.
FOLLOW = """
([url, ms]) => new Promise((resolve) => {
  const got = [];
  const seen = window.seen = { got, opens: 0 };
  const source = new EventSource(url);
  const end = (why) => { source.close(); resolve({ got, opens: seen.opens, why }); };
  source.onopen = () => { seen.opens += 1; };
  source.onmessage = (m) => {
    const frame = JSON.parse(m.data);
    got.push({ id: m.lastEventId, seq: frame.seq, state: frame.state,
               progress: frame.progress, snapshot: frame.snapshot === true });
    if (["succeeded", "failed", "cancelled"].includes(frame.state)) end("terminal");
  };
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) end("closed"); };
  setTimeout(() => end("timeout"), ms);
})
"""


async def test_an_event_source_follows_a_task_live_to_its_end(
    system: System,
    tenant: Tenant,
    http: aiohttp.ClientSession,
    browser: Browser,  # noqa: F811
) -> None:
    await system.start_api()
    await system.start_worker()
    # Grace for the worker's event behind its commit (2 busy cores): a snapshot in its
    # place would be right, but this test wants every event.
    await system.start_gateway(snapshot_grace_s="2")
    url = await _events_url(system, http, tenant, seconds=2, steps=8, task_token=False)

    page = await browser.new_page()
    try:
        await page.goto(f"{system.api_url}/healthz")  # a page of the API's own origin
        seen: dict[str, Any] = await page.evaluate(FOLLOW, [url, timeout(60) * 1000])
    finally:
        await page.close()

    got = seen["got"]
    assert seen["why"] == "terminal" and seen["opens"] == 1, seen
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1)), got
    assert [e["id"] for e in got] == [str(e["seq"]) for e in got]
    assert not any(e["snapshot"] for e in got), got
    assert got[-1]["state"] == "succeeded" and got[-1]["progress"] == 1.0
    running = [e["progress"] for e in got if e["state"] == "running"]
    assert len(running) >= 8 and running == sorted(running), got


async def test_an_event_source_with_a_task_token_reconnects_by_itself(
    system: System,
    tenant: Tenant,
    http: aiohttp.ClientSession,
    browser: Browser,  # noqa: F811
) -> None:
    """The gateway restarts while the page follows a task: the EventSource reconnects
    with the URL it has (its task token) and Last-Event-ID, and gets the rest, every
    seq once, in order, without a snapshot."""
    await system.start_api()
    await system.start_worker()
    gateway = await system.start_gateway(snapshot_grace_s="2")
    url = await _events_url(system, http, tenant, seconds=8, steps=16, task_token=True)

    page = await browser.new_page()
    try:
        await page.goto(f"{system.api_url}/healthz")
        await page.evaluate(
            f"([url, ms]) => {{ window.done = ({FOLLOW})([url, ms]); }}",
            [url, timeout(90) * 1000],
        )
        await eventually(lambda: _seen_at_least(page, 3), what="three events before the restart")
        gateway.terminate()  # ends the stream cleanly: the EventSource reconnects
        await system.start_gateway(snapshot_grace_s="2")
        seen: dict[str, Any] = await page.evaluate("window.done")
    finally:
        await page.close()

    got = seen["got"]
    assert seen["why"] == "terminal" and seen["opens"] >= 2, seen
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1)), got
    assert not any(e["snapshot"] for e in got), got
    assert got[-1]["state"] == "succeeded" and got[-1]["progress"] == 1.0


async def _seen_at_least(page: Page, count: int) -> bool:
    return bool(await page.evaluate(f"(window.seen?.got.length ?? 0) >= {count}"))


async def _events_url(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    *,
    seconds: float,
    steps: int,
    task_token: bool,
) -> str:
    """Submit a demo.sleep task; its SSE URL with a token (single-use, or its task's)."""
    async with http.post(
        f"{system.api_url}/v1/tasks",
        json={"type": "demo.sleep", "args": {"seconds": seconds, "steps": steps}},
        headers=tenant.headers,
    ) as r:
        assert r.status == 202, await r.text()
        task_id = (await r.json())["id"]
    scope = {"json": {"task_id": task_id}} if task_token else {}
    async with http.post(f"{system.api_url}/v1/ws-tokens", headers=tenant.headers, **scope) as r:
        assert r.status == 201
        token = (await r.json())["token"]
    return f"http://127.0.0.1:{system.gateway_port}/v1/tasks/{task_id}/events?token={token}"
