"""The web console in a real browser against real api, worker and gateway processes:
submit demo.sleep, watch the progress bar rise through a gateway restart, see it succeed."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.conftest import Deployment, Tenant
from tests.support import ARTIFACTS, ServiceProcess, eventually, running, timeout

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = os.environ.get("LONGHAUL_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def http_ok(port: int, path: str = "/healthz") -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.read(64)
    writer.close()
    return head.startswith(b"HTTP/1.1 200")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    # Fail, never skip: a run without a browser must not pass by testing nothing.
    assert shutil.which(CHROMIUM), (
        f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` or set LONGHAUL_TEST_CHROMIUM"
    )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def progress_of(page: Page, task_id: str) -> float:
    value: Any = await page.locator(f'tr[data-task-id="{task_id}"] progress').evaluate(
        "el => el.value"
    )
    return float(value)


async def state_of(page: Page, task_id: str) -> str:
    return (await page.locator(f'tr[data-task-id="{task_id}"] td.state').inner_text()).strip()


async def test_console_follows_a_task_through_a_gateway_restart(
    deployment: Deployment, tenant: Tenant, ports: dict[str, str], browser: Browser
) -> None:
    """The console signs in from #key=, submits demo.sleep, shows progress rising while
    the gateway is killed and restarted, resumes, and shows the task succeeded."""
    gw_port = ports["gateway_port"]
    env = deployment.env(**ports, public_ws_url=f"ws://127.0.0.1:{gw_port}/v1/ws")
    with running("services.worker", env), running("services.api", env) as api:
        gateway = ServiceProcess("services.ws_gateway", env, name="gateway-1")
        try:
            await eventually(lambda: http_ok(int(ports["api_port"])), what="api up")
            await eventually(lambda: http_ok(int(gw_port)), what="gateway up")
            page = await browser.new_page()
            console_errors: list[str] = []
            page.on("pageerror", lambda exc: console_errors.append(str(exc)))
            # The console runs under its Content-Security-Policy: anything it blocks is
            # a part of the console that does not work.
            await page.add_init_script(
                "window.blocked = []; document.addEventListener('securitypolicyviolation',"
                " (e) => window.blocked.push(`${e.violatedDirective} ${e.blockedURI}`));"
            )
            response = await page.goto(f"http://127.0.0.1:{ports['api_port']}/#key={tenant.key}")
            assert response is not None
            assert "connect-src" in response.headers["content-security-policy"]
            await page.locator("#connection.conn-open").wait_for(timeout=timeout(20) * 1000)
            assert "key=" not in page.url, "the key must leave the address bar"

            # Tasks of earlier tests of this tenant are listed too: ours is the new row.
            rows = page.locator("#task-rows tr")
            before = set(await rows.evaluate_all("rs => rs.map(r => r.dataset.taskId)"))
            await page.select_option("#task-type", "demo.sleep")
            await page.fill("#task-args", '{"seconds": 8, "steps": 16}')
            await page.click("#submit-button")

            async def new_row() -> str | None:
                ids = await rows.evaluate_all("rs => rs.map(r => r.dataset.taskId)")
                fresh = [i for i in ids if i not in before]
                return fresh[0] if fresh else None

            task_id = await eventually(new_row, within=10, what="the submitted task's row")

            seen: list[float] = []

            async def rising() -> bool:
                seen.append(await progress_of(page, task_id))
                return 0 < seen[-1] < 0.5

            await eventually(rising, within=20, what="progress bar moving")

            # Kill the gateway mid-task and bring it back on the same port.
            gateway.kill9()
            await page.locator("#connection.conn-reconnecting").wait_for(timeout=timeout(10) * 1000)
            before_restart = await progress_of(page, task_id)
            gateway = ServiceProcess("services.ws_gateway", env, name="gateway-2")
            await eventually(lambda: http_ok(int(gw_port)), what="gateway back")
            await page.locator("#connection.conn-open").wait_for(timeout=timeout(30) * 1000)

            async def done() -> bool:
                seen.append(await progress_of(page, task_id))
                return await state_of(page, task_id) == "succeeded"

            try:
                await eventually(
                    done, within=40, interval=0.1, what="task succeeded in the console"
                )
            except AssertionError:
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "console-failure.png"), full_page=True)
                raise
            assert seen == sorted(seen), f"progress went backwards: {seen}"
            assert seen[-1] == 1.0 and before_restart < 1.0
            assert any(before_restart < p < 1.0 for p in seen) or before_restart > 0

            # The event log replays the whole story: consecutive seqs, nothing lost.
            await page.click(f'tr[data-task-id="{task_id}"] button[data-action="events"]')
            await eventually(lambda: _log_done(page), within=10, what="event log complete")
            entries = await page.locator("#event-log li").all_inner_texts()
            seqs = [int(e.split()[0].lstrip("#")) for e in entries]
            assert seqs == list(range(1, len(seqs) + 1)), entries
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            assert not console_errors, console_errors
            assert await page.evaluate("window.blocked") == []
        finally:
            gateway.terminate()
        assert api.alive()


async def _log_done(page: Page) -> bool:
    texts = await page.locator("#event-log li").all_inner_texts()
    return bool(texts) and "succeeded" in texts[-1]
