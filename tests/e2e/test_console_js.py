"""The web console's own logic in headless Chromium, with the API answered by the test
and the WebSocket scripted (as in test_client_js.py): what it subscribes to, how it
takes a busy API at sign-in, and how it shows errors. The console against the real
system is test_browser.py's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route

from services.api.ops import console_headers
from tests.e2e.test_browser import browser  # noqa: F401 - the fixture
from tests.e2e.test_client_js import FAKE_WEBSOCKET
from tests.support import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CONSOLE = Path(__file__).parents[2] / "services" / "api" / "console"
ORIGIN = "http://console.test"
GATEWAY = "ws://gw/v1/ws"
TYPES = {"items": [{"name": "demo.sleep", "args_schema": {"type": "object"}}]}


def _task(n: int, state: str, last_seq: int = 3) -> dict[str, Any]:
    return {
        "id": f"0192f5c8-0000-7000-8000-{n:012d}",
        "type": "demo.sleep",
        "args": {},
        "state": state,
        "progress": 1.0 if state == "succeeded" else 0.5,
        "message": None,
        "result": None,
        "error": None,
        "attempts": 1,
        "max_attempts": 5,
        "last_seq": last_seq,
    }


Answer = tuple[int, Any, dict[str, str]]
# No answer at all: the request fails as a lost connection does.
NETWORK_DOWN: Answer = (0, None, {})


class FakeApi:
    """The API as the console sees it: a queue of answers per path (the last repeats)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[Answer]] = {}
        self.calls: list[str] = []
        self.idempotency_keys: list[str | None] = []  # of each submission

    def on(self, path: str, *answers: Answer) -> None:
        self.answers[path] = list(answers)

    async def serve(self, route: Route) -> None:
        url = route.request.url.removeprefix(ORIGIN)
        path = url.split("#")[0]
        if path.startswith("/console/") and path != "/console/config.json":
            name = path.removeprefix("/console/") or "index.html"
            kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
            kind = kinds[Path(name).suffix]
            # Under the API's own policy for them, which lets the console connect to
            # the configured gateway (and to its API) only.
            await route.fulfill(
                body=(CONSOLE / name).read_text(),
                content_type=kind,
                headers=console_headers(GATEWAY),
            )
            return
        self.calls.append(f"{route.request.method} {path}")
        if f"{route.request.method} {path}" == "POST /v1/tasks":
            self.idempotency_keys.append(route.request.headers.get("idempotency-key"))
        key = next((p for p in self.answers if path.startswith(p)), None)
        queue = self.answers.get(key or "", [(404, {"title": "Not Found"}, {})])
        status, body, headers = queue.pop(0) if len(queue) > 1 else queue[0]
        if status == NETWORK_DOWN[0]:
            await route.abort()
            return
        text = body if isinstance(body, str) else json.dumps(body)
        await route.fulfill(status=status, body=text, headers=headers)


@pytest.fixture
async def console(browser: Browser) -> AsyncIterator[tuple[FakeApi, Callable[[], Any]]]:  # noqa: F811
    api = FakeApi()
    api.on("/console/config.json", (200, {"gateway_url": GATEWAY}, {}))
    api.on("/v1/ws-tokens", (200, {"token": "t", "expires_in": 60}, {}))
    page = await browser.new_page()
    await page.route(f"{ORIGIN}/**", api.serve)
    await page.add_init_script(FAKE_WEBSOCKET)

    async def open_console(fake_clock: bool = False) -> Page:
        if fake_clock:  # timers then run only as the test moves the clock on
            await page.clock.install()
        await page.goto(f"{ORIGIN}/console/#key=lh_test_key")
        return page

    try:
        yield api, open_console
    finally:
        await page.close()


async def _sent(page: Page) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = await page.evaluate("sockets.flatMap((s) => s.sent)")
    return frames


async def test_only_tasks_that_can_change_are_followed(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """Ended tasks are not subscribed to (a connection's subscriptions are capped, and
    a console left open listed ever more of them); a task that ends is unsubscribed."""
    api, open_console = console
    done = [_task(n, "succeeded") for n in range(1, 8)]
    live = [_task(n, "running") for n in (8, 9)]
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [*live, *done], "next_cursor": None}, {}))
    page = await open_console()
    await eventually(lambda: page.evaluate("sockets.length === 1"), what="a socket")
    await page.evaluate("sockets[0].open()")

    async def subscribed() -> list[str] | None:
        ids = [f["task_id"] for f in await _sent(page) if f["op"] == "subscribe"]
        return ids or None

    assert sorted(await eventually(subscribed)) == sorted(t["id"] for t in live)
    ended = {**live[0], "type": "event", "task_id": live[0]["id"], "seq": 4, "state": "failed"}
    await page.evaluate("(frame) => sockets[0].feed(frame)", ended)

    async def unsubscribed() -> bool:
        return {"op": "unsubscribe", "task_id": live[0]["id"]} in await _sent(page)

    await eventually(unsubscribed, what="the ended task to be unsubscribed")


async def test_a_busy_api_at_sign_in_is_retried_not_a_refused_key(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    api, open_console = console
    busy = {"title": "Too Many Requests", "status": 429, "detail": "over the rate limit"}
    api.on("/v1/task-types", (429, busy, {"Retry-After": "1"}), (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page = await open_console()
    notice = page.locator("#notice")
    await eventually(notice.text_content, what="the notice")
    assert "Trying again in 1 s" in (await notice.text_content() or "")
    assert await page.locator("#sign-in").is_hidden()
    await page.locator("#app").wait_for(state="visible", timeout=10_000)
    assert api.calls.count("GET /v1/task-types") == 2


async def test_errors_are_told_once_and_a_proxys_page_by_its_status(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    api, open_console = console
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page = await open_console()
    await page.locator("#app").wait_for(state="visible", timeout=10_000)
    invalid = {
        "title": "Invalid request",
        "status": 422,
        "detail": "body.args.seconds: must be >= 0",
        "errors": [{"loc": ["body", "args", "seconds"], "msg": "must be >= 0"}],
    }
    api.on("/v1/tasks", (422, invalid, {}))
    await page.locator("#submit-button").click()
    await eventually(lambda: page.locator("#notice").text_content(), what="the notice")
    text = await page.locator("#notice").text_content() or ""
    assert text.count("must be >= 0") == 1, text
    api.on("/v1/tasks", (502, "<html><body>Bad Gateway</body></html>", {}))
    await page.locator("#submit-button").click()

    async def told_502() -> bool:
        return "HTTP 502" in (await page.locator("#notice").text_content() or "")

    await eventually(told_502, what="the 502 by its status")


async def test_a_mangled_key_link_shows_the_sign_in_form(browser: Browser) -> None:  # noqa: F811
    api = FakeApi()
    page = await browser.new_page()
    await page.route(f"{ORIGIN}/**", api.serve)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{ORIGIN}/console/#key=%E0%A4%A")
    await page.locator("#sign-in").wait_for(state="visible", timeout=10_000)
    await page.close()
    assert errors == []


async def test_the_event_log_shows_a_tasks_whole_story_whatever_arrives_first(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """ "Events" asks for the task's story from seq 0; a live event and a snapshot the
    gateway sent before it read that subscribe arrive ahead of the replay, and the log
    still shows every seq from 1, in order (before, it began at that live event, and
    then at that snapshot)."""
    api, open_console = console
    task = _task(1, "running", last_seq=5)
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [task], "next_cursor": None}, {}))
    page = await open_console()
    await eventually(lambda: page.evaluate("sockets.length === 1"), what="a socket")
    await page.evaluate("sockets[0].open()")
    row = page.locator(f'tr[data-task-id="{task["id"]}"]')
    await row.wait_for(timeout=10_000)
    await row.locator('button[data-action="events"]').click()

    def event(seq: int) -> dict[str, Any]:
        return {
            "type": "event",
            "task_id": task["id"],
            "seq": seq,
            "state": "running",
            "progress": seq / 10,
            "message": None,
            "ts": "t",
        }

    # The old subscription's last frames (a recheck's snapshot among them), then the
    # answer to the client's sync, then the new subscription's replay.
    early = [event(6), {**event(8), "snapshot": True}]
    await page.evaluate("(frames) => frames.forEach((f) => sockets[0].feed(f))", early)
    await page.evaluate("sockets[0].answerSyncs()")
    replay = [event(s) for s in range(1, 9)]
    await page.evaluate("(frames) => frames.forEach((f) => sockets[0].feed(f))", replay)
    entries = await page.locator("#event-log li").all_inner_texts()
    assert [int(e.split()[0].lstrip("#")) for e in entries] == list(range(1, 9)), entries
    assert not any("snapshot" in e for e in entries), entries
    # Followed anew from seq 0: unsubscribed, synced, subscribed (nothing is lost in
    # between: the new subscription replays from 0).
    sent = [
        (f["op"], f["after_seq"] if f["op"] == "subscribe" else None) for f in await _sent(page)
    ]
    assert sent == [("subscribe", 5), ("unsubscribe", None), ("subscribe", 0), ("subscribe", 0)]


async def test_a_gateway_that_never_accepts_is_shown_not_retried_quietly(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """Connections refused before they open (as a 403 for an Origin not allowed is)
    turn the indicator to "Cannot connect" with a notice saying what to check; the
    first connection that opens clears both."""
    api, open_console = console
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page = await open_console(fake_clock=True)

    async def refused() -> bool:
        # Each connection is refused as soon as it is made; the client's backoff paces
        # them, on a clock the test moves on.
        await page.evaluate("sockets.filter((s) => s.readyState === 0).forEach((s) => s.drop())")
        await page.clock.run_for(2000)
        return await page.locator("#connection.conn-refused").count() == 1

    await eventually(refused, within=60, what="the refused state")
    assert "Cannot connect" in (await page.locator("#connection-text").text_content() or "")
    notice = await page.locator("#notice").text_content() or ""
    assert "LONGHAUL_ALLOWED_ORIGINS" in notice, notice

    async def retried() -> bool:
        await page.clock.run_for(2000)
        return bool(await page.evaluate("sockets.at(-1).readyState === 0"))

    await eventually(retried, within=60, what="a retry")
    await page.evaluate("sockets.at(-1).open()")
    await page.locator("#connection.conn-open").wait_for(timeout=10_000)
    assert await page.locator("#notice").is_hidden()


async def test_a_gateway_url_that_cannot_be_used_is_shown(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """A gateway URL no socket can be made from is told in the header and the notice,
    with the browser's reason (before: "Connecting…" forever, the error swallowed), and
    Retry, which reloads the console, starts live updates once the configuration is
    fixed (before, nothing offered a way out: the client does not retry an "error")."""
    api, open_console = console
    api.on("/console/config.json", (200, {"gateway_url": "ws//no-scheme/v1/ws"}, {}))
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page = await open_console()
    await page.locator("#connection.conn-error").wait_for(timeout=10_000)
    text = await page.locator("#connection-text").text_content() or ""
    assert text == "Live updates unavailable"
    notice = await page.locator("#notice").text_content() or ""
    assert "Live updates cannot start: TypeError" in notice, notice
    retry = page.get_by_role("button", name="Retry")
    assert await retry.is_visible()

    api.on("/console/config.json", (200, {"gateway_url": GATEWAY}, {}))
    async with page.expect_navigation():
        await retry.click()
    await eventually(lambda: page.evaluate("sockets.length === 1"), what="a socket")
    assert (await page.evaluate("sockets[0].url")).startswith(f"{GATEWAY}?token=")
    await page.evaluate("sockets[0].open()")
    await page.locator("#connection.conn-open").wait_for(timeout=10_000)
    assert await retry.is_hidden()
    assert await page.locator("#app").is_visible()  # signed in again with the key kept


OURS = "lh_ops_ourkeyid0001_" + "S" * 43
THEIRS = "lh_live_theirkeyid01_" + "T" * 43


@pytest.mark.parametrize("answer", ["dismiss", "accept"])
async def test_a_key_link_asks_before_replacing_the_key_signed_in(
    console: tuple[FakeApi, Callable[[], Any]], answer: str
) -> None:
    """A #key= link with another key than the one signed in here asks first, naming both
    by their public part (never a secret); refused, the console stays signed in with its
    own key and says the link's was ignored. The header shows which key is signed in."""
    api, _ = console
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page: Page = await _signed_in_as(console, OURS)
    asked: list[str] = []

    async def on_dialog(dialog: Any) -> None:
        asked.append(dialog.message)
        await (dialog.dismiss() if answer == "dismiss" else dialog.accept())

    page.on("dialog", on_dialog)
    await page.goto("about:blank")
    await page.goto(f"{ORIGIN}/console/#key={THEIRS}")
    await page.locator("#app").wait_for(state="visible", timeout=10_000)
    assert len(asked) == 1, asked
    assert "lh_live_theirkeyid01_…" in asked[0] and "lh_ops_ourkeyid0001_…" in asked[0]
    assert "SSSS" not in asked[0] and "TTTT" not in asked[0]
    kept = OURS if answer == "dismiss" else THEIRS
    assert await page.evaluate("localStorage.getItem('longhaul.apiKey')") == kept
    shown = await page.locator("#signed-in-key").text_content()
    assert shown == ("lh_ops_ourkeyid0001_…" if answer == "dismiss" else "lh_live_theirkeyid01_…")
    if answer == "dismiss":
        notice = await page.locator("#notice").text_content() or ""
        assert "ignored" in notice and "lh_live_theirkeyid01_…" in notice, notice
    # The same key again asks nothing.
    await page.goto("about:blank")
    await page.goto(f"{ORIGIN}/console/#key={kept}")
    await page.locator("#app").wait_for(state="visible", timeout=10_000)
    assert len(asked) == 1


async def _signed_in_as(console: tuple[FakeApi, Callable[[], Any]], key: str) -> Page:
    _, open_console = console
    page: Page = await open_console()  # signs in with a link: nothing stored yet, no question
    await page.locator("#app").wait_for(state="visible", timeout=10_000)
    await page.evaluate("(key) => localStorage.setItem('longhaul.apiKey', key)", key)
    return page


UNAUTHORIZED = (401, {"title": "Unauthorized", "status": 401, "detail": "bad API key"}, {})


async def test_a_stored_key_the_api_refuses_is_forgotten(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """A key kept in this browser that the API refuses (revoked) is forgotten, and the
    sign-in form says why: the next load asks for a key instead of sending the refused
    one again (before, it stayed in localStorage and was tried at every load)."""
    api, _ = console
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page: Page = await _signed_in_as(console, OURS)
    api.on("/v1/task-types", UNAUTHORIZED)
    await page.goto("about:blank")
    await page.goto(f"{ORIGIN}/console/")
    await page.locator("#sign-in").wait_for(state="visible", timeout=10_000)
    assert await page.evaluate("localStorage.getItem('longhaul.apiKey')") is None
    notice = await page.locator("#notice").text_content() or ""
    assert "refused the API key lh_ops_ourkeyid0001_…" in notice, notice
    assert "no longer keeps it" in notice, notice
    tried = api.calls.count("GET /v1/task-types")
    await page.reload()
    await page.locator("#sign-in").wait_for(state="visible", timeout=10_000)
    assert api.calls.count("GET /v1/task-types") == tried


@pytest.mark.parametrize("seen_by", ["ws-token", "submit"])
async def test_a_key_refused_while_signed_in_signs_out_and_is_forgotten(
    console: tuple[FakeApi, Callable[[], Any]], seen_by: str
) -> None:
    """A key revoked while the console is open: the first 401 for it, from a token fetch
    for a reconnect or from any API call, signs out with a message and forgets the key
    (before, a refused token left "Live updates refused" and the key kept, and a refused
    submit only said it was not submitted)."""
    api, _ = console
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page: Page = await _signed_in_as(console, OURS)
    await eventually(lambda: page.evaluate("sockets.length === 1"), what="a socket")
    await page.evaluate("sockets[0].open()")
    await page.locator("#connection.conn-open").wait_for(timeout=10_000)
    if seen_by == "ws-token":
        api.on("/v1/ws-tokens", UNAUTHORIZED)
        await page.evaluate("sockets[0].drop()")  # the reconnect asks for a token
    else:
        api.on("/v1/tasks", UNAUTHORIZED)
        await page.locator("#submit-button").click()
    await page.locator("#sign-in").wait_for(state="visible", timeout=10_000)
    assert await page.locator("#app").is_hidden()
    notice = await page.locator("#notice").text_content() or ""
    assert "refused the API key" in notice and "no longer keeps it" in notice, notice
    assert await page.evaluate("localStorage.getItem('longhaul.apiKey')") is None


async def test_a_configuration_that_cannot_be_loaded_is_told_and_loaded_again(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """If /console/config.json fails, the console says so and loads it again a few
    seconds later; it guesses no gateway URL (before, it made a socket to
    ws://<this host>:8001, outside the page's policy: the browser blocked it, and the
    header said "Connecting…" for ever). The task list works meanwhile, and its tasks
    are followed once the gateway is known."""
    api, open_console = console
    task = _task(1, "running")
    bad_gateway = (502, "<html><body>Bad Gateway</body></html>", {})
    api.on("/console/config.json", bad_gateway, (200, {"gateway_url": GATEWAY}, {}))
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [task], "next_cursor": None}, {}))
    page = await open_console(fake_clock=True)
    await page.locator(f'tr[data-task-id="{task["id"]}"]').wait_for(timeout=10_000)

    async def settled() -> bool:
        shown = "sockets.length > 0 || document.querySelector('#connection.conn-error') !== null"
        return bool(await page.evaluate(shown))

    await eventually(settled, what="a socket, or the error")
    assert await page.evaluate("sockets.map((s) => s.url)") == []
    assert await page.locator("#connection-text").text_content() == "Live updates unavailable"
    notice = await page.locator("#notice").text_content() or ""
    assert "configuration (/console/config.json) could not be loaded (HTTP 502)" in notice, notice
    assert "Trying again in 5 s" in notice, notice

    await page.clock.run_for(5000)
    await eventually(lambda: page.evaluate("sockets.length === 1"), what="a socket")
    assert (await page.evaluate("sockets[0].url")).startswith(f"{GATEWAY}?token=")
    await page.evaluate("sockets[0].open()")
    await page.locator("#connection.conn-open").wait_for(timeout=10_000)
    assert await page.locator("#notice").is_hidden()
    subscribe = {"op": "subscribe", "task_id": task["id"], "after_seq": task["last_seq"]}
    assert await _sent(page) == [subscribe]


async def test_sign_in_tells_an_api_out_of_reach_from_a_failure_of_its_own(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """At sign-in, a request that gets no answer is told as such and tried again; the
    console's own start failing (here on an answer it cannot use) is told as what it is,
    once (before, both said "Cannot reach the API", and the retries started the console
    again and again)."""
    api, open_console = console
    api.on("/v1/task-types", NETWORK_DOWN, (200, {"items": None}, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page = await open_console(fake_clock=True)
    notice = page.locator("#notice")

    async def told(words: str) -> bool:
        return words in (await notice.text_content() or "")

    await eventually(lambda: told("Trying again in 5 s"), what="the retry")
    assert (await notice.text_content() or "").startswith("Cannot reach the API ("), notice
    await page.clock.run_for(5000)
    await eventually(lambda: told("The console failed to start: TypeError"), what="the failure")
    await page.clock.run_for(60_000)
    assert api.calls.count("GET /v1/task-types") == 2


# Opens the latest socket and returns the URLs the console fetched as it opened.
FETCHED_ON_OPEN = """() => {
  const fetched = [], real = window.fetch;
  window.fetch = (url, options) => { fetched.push(String(url)); return real(url, options); };
  try { sockets.at(-1).open(); } finally { window.fetch = real; }
  return fetched;
}"""


async def test_a_sign_in_after_a_sign_out_is_no_reconnect(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """A reconnect lists the tasks again (some may have been made meanwhile); the first
    connection after a sign-out and a sign-in is no reconnect (before, it listed them
    again as if it were)."""
    api, open_console = console
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page = await open_console()
    await eventually(lambda: page.evaluate("sockets.length === 1"), what="a socket")
    assert await page.evaluate(FETCHED_ON_OPEN) == []
    await page.evaluate("sockets[0].drop()")
    await eventually(lambda: page.evaluate("sockets.length === 2"), what="a reconnect")
    assert await page.evaluate(FETCHED_ON_OPEN) == ["/v1/tasks?limit=50"]
    await page.locator("#sign-out").click()
    await page.locator("#api-key").fill("lh_test_key")
    await page.get_by_role("button", name="Sign in").click()
    await eventually(lambda: page.evaluate("sockets.length === 3"), what="a socket")
    assert await page.evaluate(FETCHED_ON_OPEN) == []


async def test_a_submission_of_unknown_outcome_is_told_so_and_safe_to_submit_again(
    console: tuple[FakeApi, Callable[[], Any]],
) -> None:
    """A 504 (outcome-unknown) says the task may be stored and may run, that the task
    list shows whether it was, and that submitting it again is safe: the same submission
    again carries the same Idempotency-Key (before, it said "Not submitted", and a
    submission again, with no key, could run the task twice). A new submission after
    that has a key of its own."""
    api, open_console = console
    api.on("/v1/task-types", (200, TYPES, {}))
    api.on("/v1/tasks", (200, {"items": [], "next_cursor": None}, {}))
    page = await open_console(fake_clock=True)  # no list refresh takes the answers below

    async def posted(n: int) -> bool:
        return len(api.idempotency_keys) == n

    await page.locator("#no-tasks").wait_for(timeout=10_000)  # listed: the list's answer is used
    unknown = {
        "type": "https://longhaul.dev/problems/outcome-unknown",
        "title": "Outcome unknown",
        "status": 504,
        "detail": "the database connection broke while the task was being stored",
    }
    task = _task(1, "queued")
    api.on("/v1/tasks", (504, unknown, {"Retry-After": "5"}), (202, task, {}), (202, task, {}))
    notice = page.locator("#notice")
    submit = page.locator("#submit-button")
    await submit.click()
    await eventually(notice.text_content, what="the notice")
    text = await notice.text_content() or ""
    assert text.startswith("Outcome unknown:") and "may run" in text, text
    assert "task list shows it" in text and "same Idempotency-Key" in text, text
    await submit.click()
    await page.locator(f'tr[data-task-id="{task["id"]}"]').wait_for(timeout=10_000)
    await submit.click()
    await eventually(lambda: posted(3), what="the third submission")
    first, again, new = api.idempotency_keys
    assert first and again == first, api.idempotency_keys
    assert new and new != first
