"""The browser client module (longhaul-client.js) in a real headless Chromium, with the
page's WebSocket replaced by a scripted one: the orderings a live gateway rarely
produces on cue (a handler added after the task ended, the network coming back while
a reconnect waits for its token, a refused subscription) are played exactly.

The client against the real gateway, through a restart, is test_browser.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route

from tests.e2e.test_browser import browser  # noqa: F401 - the fixture

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CLIENT = Path(__file__).parents[2] / "services" / "api" / "console" / "longhaul-client.js"
ORIGIN = "http://client.test"

# Installed before the page's scripts: every WebSocket the client opens is one of these,
# opened, fed and closed by the scenarios below.
FAKE_WEBSOCKET = """
window.sockets = [];
window.onlineListeners = [];
class FakeWebSocket {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
  constructor(url) { this.url = String(url); this.readyState = 0; this.sent = [];
                     window.sockets.push(this); }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() { this.readyState = 3; }
  open() { this.readyState = 1; this.onopen?.(); }
  feed(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  // 1006 is what a browser reports for a connection lost, or a handshake refused.
  drop(code = 1006, reason = "") { this.readyState = 3; this.onclose?.({ code, reason }); }
  // An error, with no close after it (unless drop() follows).
  fail() { this.onerror?.({}); }
  // The gateway's answer to the client's syncs not answered yet (subscribes for an id
  // that is no task: a not_found error, in its turn).
  answerSyncs() {
    this.answered ??= new Set();
    for (const f of this.sent) {
      if (f.op !== "subscribe" || !f.task_id.startsWith("longhaul-client:sync:")) continue;
      if (this.answered.has(f.task_id)) continue;
      this.answered.add(f.task_id);
      this.feed({ type: "error", code: "not_found", message: "no such task", task_id: f.task_id });
    }
  }
}
window.WebSocket = FakeWebSocket;
window.tick = () => new Promise((resolve) => setTimeout(resolve, 10));
// Waits for a condition, generously: a slow machine is no failure.
window.until = async (check) => {
  for (let i = 0; i < 2000 && !check(); i++) await new Promise((r) => setTimeout(r, 5));
  if (!check()) throw new Error(`never: ${check}`);
};
"""


def _serve_client(
    title: str, headers: dict[str, str] | None = None
) -> Callable[[Route], Awaitable[None]]:
    """A route handler serving the client module, and an empty page for the rest (with
    ``headers``)."""

    async def serve(route: Route) -> None:
        if route.request.url.endswith("/longhaul-client.js"):
            await route.fulfill(body=CLIENT.read_text(), content_type="text/javascript")
        else:
            await route.fulfill(
                body=f"<!doctype html><title>{title}</title>",
                content_type="text/html",
                headers=headers,
            )

    return serve


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:  # noqa: F811 - the fixture
    page = await browser.new_page()
    await page.route(f"{ORIGIN}/**", _serve_client("client"))
    await page.add_init_script(FAKE_WEBSOCKET)
    await page.goto(f"{ORIGIN}/")
    try:
        yield page
    finally:
        await page.close()


# A client on the fake socket, that socket open (a reconnect comes at once): ``client``
# and ``ws`` in scope.
OPEN_CLIENT = (
    'const client = new LonghaulClient({ gatewayUrl: "ws://gw/v1/ws", getToken: async () => "t",'
    " baseDelayMs: 1 }); await tick(); const ws = sockets[0]; ws.open();"
)


async def run(page: Page, body: str) -> Any:
    """``body``: an async function's statements, with LonghaulClient in scope."""
    return await page.evaluate(
        "async () => { const { LonghaulClient } = await import('/longhaul-client.js');"
        f" {body} }}"
    )


TASK = "0192f5c8-0000-7000-8000-00000000000a"
OTHER = "0192f5c8-0000-7000-8000-00000000000b"


async def test_a_handler_added_after_the_end_gets_the_events_from_its_own_seq(
    page: Page,
) -> None:
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const first = [], second = [];
        client.subscribe("{TASK}", {{ onEvent: (e) => first.push(e.seq) }});
        const events = [
          {{ type: "event", task_id: "{TASK}", seq: 1, state: "queued" }},
          {{ type: "event", task_id: "{TASK}", seq: 2, state: "succeeded" }},
        ];
        events.forEach((e) => ws.feed(e));
        client.subscribe("{TASK}", {{ onEvent: (e) => second.push(e.seq), afterSeq: 0 }});
        ws.answerSyncs();
        events.forEach((e) => ws.feed(e));  // the gateway replays from the new after_seq
        client.close();
        return {{ first, second, sent: ws.sent }};
        """,
    )
    assert result["first"] == [1, 2]  # no duplicate from the replay
    assert result["second"] == [1, 2]
    assert result["sent"] == [
        {"op": "subscribe", "task_id": TASK, "after_seq": 0},
        # Followed anew from the new handler's seq, with a sync in between (see below).
        {"op": "unsubscribe", "task_id": TASK},
        {"op": "subscribe", "task_id": "longhaul-client:sync:1", "after_seq": 0},
        {"op": "subscribe", "task_id": TASK, "after_seq": 0},
    ]


async def test_the_network_back_during_a_reconnect_makes_no_second_socket(page: Page) -> None:
    result = await run(
        page,
        f"""
        let tokens = 0, release;
        const client = new LonghaulClient({{
          gatewayUrl: "ws://gw/v1/ws", baseDelayMs: 1,
          getToken: () => {{
            tokens += 1;
            if (tokens === 2) return new Promise((resolve) => {{ release = () => resolve("t2"); }});
            return Promise.resolve("t" + tokens);
          }},
        }});
        await tick();
        sockets[0].open();
        client.subscribe("{TASK}", {{}});
        sockets[0].drop();                           // a reconnect starts; its token hangs
        await tick(); await tick();
        window.dispatchEvent(new Event("online"));   // the network is back meanwhile
        await tick(); await tick();
        release(); await tick();
        const made = sockets.length;
        sockets[sockets.length - 1].open();
        const current = sockets.indexOf(client.socket);
        client.close();
        return {{ made, current, states: sockets.map((s) => s.readyState),
                  sent: sockets.map((s) => s.sent.length) }};
        """,
    )
    assert result["made"] == 2, result
    assert result["current"] == 1
    assert result["states"] == [3, 3]  # close() left nothing open
    assert result["sent"] == [1, 1]  # one subscribe each: the first, then the resume


async def test_ids_in_any_case_and_refused_subscriptions(page: Page) -> None:
    upper = TASK.upper()
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const got = [], errors = [];
        client.subscribe("{upper}", {{ onEvent: (e) => got.push(e.seq) }});
        // The gateway names tasks in lower case.
        sockets[0].feed({{ type: "event", task_id: "{TASK}", seq: 1, state: "queued" }});
        const refused = "0192f5c8-0000-7000-8000-00000000000b";
        client.subscribe(refused, {{ onError: (e) => errors.push(e.code) }});
        sockets[0].feed({{ type: "error", task_id: refused, code: "too_many_subscriptions",
                           message: "cap" }});
        sockets[0].drop();
        await tick(); await tick(); await tick();
        sockets[1].open();
        const resumed = sockets[1].sent;
        client.close();
        return {{ got, errors, resumed, lastSeq: client.lastSeq("{upper}") }};
        """,
    )
    assert result["got"] == [1] and result["lastSeq"] == 1
    assert result["errors"] == ["too_many_subscriptions"]
    # The refused task is not subscribed again behind the page's back.
    assert result["resumed"] == [{"op": "subscribe", "task_id": TASK, "after_seq": 1}]


@pytest.mark.parametrize(
    "written",
    [
        "{" + TASK + "}",
        "urn:uuid:" + TASK,
        TASK.replace("-", "").upper(),
        "{urn:uuid:" + TASK.upper() + "}",
    ],
)
async def test_an_id_in_any_form_the_gateway_reads_gets_its_events(
    page: Page, written: str
) -> None:
    """The gateway reads any form of a UUID Python's UUID() takes, and names the task in
    its canonical form: the client follows the same task whichever form it was given,
    and sends it canonical. A non-UUID goes as written, as the gateway's not_found names
    it."""
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const got = [], errors = [];
        client.subscribe("{written}", {{ onEvent: (e) => got.push(e.seq) }});
        sockets[0].feed({{ type: "event", task_id: "{TASK}", seq: 1, state: "queued" }});
        client.subscribe("Not-A-Task", {{ onError: (e) => errors.push(e.code) }});
        sockets[0].feed({{ type: "error", task_id: "Not-A-Task", code: "not_found",
                           message: "no such task" }});
        const sent = sockets[0].sent;
        client.close();
        return {{ got, errors, sent, lastSeq: client.lastSeq("{written}") }};
        """,
    )
    assert result["got"] == [1] and result["lastSeq"] == 1
    assert result["errors"] == ["not_found"]
    assert [m["task_id"] for m in result["sent"]] == [TASK, "Not-A-Task"]


async def test_a_subscribe_again_gets_its_replay_not_the_live_event_ahead_of_it(
    page: Page,
) -> None:
    """A subscribe again restarts the task's stream, but a live event the gateway sent
    before it read that subscribe arrives first: a handler added behind the others, or
    one that follows the task anew after an unsubscribe, still gets every seq from its
    own, in order (before, it took that live event and dropped the replay as old)."""
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const ev = (seq) => ({{ type: "event", task_id: "{TASK}", seq, state: "running" }});
        const first = [], second = [], anew = [];
        const sub = client.subscribe("{TASK}", {{ onEvent: (e) => first.push(e.seq) }});
        for (let s = 1; s <= 5; s++) ws.feed(ev(s));
        client.subscribe("{TASK}", {{ onEvent: (e) => second.push(e.seq), afterSeq: 0 }});
        ws.feed(ev(6));                              // live, sent before the subscribe was read
        ws.answerSyncs();
        for (let s = 1; s <= 7; s++) ws.feed(ev(s)); // then the replay from 0, and 7 live
        // The console's way to show a task's whole story: unsubscribe, subscribe from 0.
        sub.unsubscribe();
        client.close();
        const other = new LonghaulClient({{ gatewayUrl: "ws://gw/v1/ws", getToken: async () => "t" }});
        await tick();
        const ws2 = sockets[1];
        ws2.open();
        const only = other.subscribe("{TASK}", {{}});
        for (let s = 1; s <= 4; s++) ws2.feed(ev(s));
        only.unsubscribe();
        other.subscribe("{TASK}", {{ onEvent: (e) => anew.push(e.seq), afterSeq: 0 }});
        ws2.feed(ev(5));                             // the old subscription's last live event
        ws2.answerSyncs();
        for (let s = 1; s <= 6; s++) ws2.feed(ev(s));
        other.close();
        return {{ first, second, anew, lastSeq: other.lastSeq("{TASK}") }};
        """,
    )
    assert result["first"] == [1, 2, 3, 4, 5, 6, 7]
    assert result["second"] == [1, 2, 3, 4, 5, 6, 7]
    assert result["anew"] == [1, 2, 3, 4, 5, 6]


async def test_a_snapshot_meant_for_the_old_subscription_does_not_skip_a_replay(
    page: Page,
) -> None:
    """A snapshot the gateway sent on the task's subscription just before it read a
    subscribe again (a recheck: the database had 6..8, the stream not yet) is the old
    subscription's: the handler that subscribe is for waits for the sync the client sent
    after its unsubscribe, then gets the replay from its own seq (before, it took the
    snapshot as news and dropped the replay 1..7 as old). The same for a task followed
    again after an unsubscribe."""
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const ev = (seq, extra = {{}}) => ({{ type: "event", task_id: "{TASK}", seq, state: "running", ...extra }});
        const first = [], behind = [], anew = [];
        const sub = client.subscribe("{TASK}", {{ onEvent: (e) => first.push(e.seq) }});
        for (let s = 1; s <= 5; s++) ws.feed(ev(s));
        const late = client.subscribe("{TASK}", {{ onEvent: (e) => behind.push(e.seq), afterSeq: 0 }});
        ws.feed(ev(8, {{ snapshot: true }}));          // sent before the gateway read the restart
        ws.answerSyncs();
        for (let s = 1; s <= 9; s++) ws.feed(ev(s));  // the new subscription: from 0, all retained
        sub.unsubscribe();
        late.unsubscribe();
        client.subscribe("{TASK}", {{ onEvent: (e) => anew.push(e.seq), afterSeq: 0 }});
        ws.feed(ev(10, {{ snapshot: true }}));         // before the gateway read the unsubscribe
        ws.answerSyncs();
        for (let s = 1; s <= 10; s++) ws.feed(ev(s));
        client.close();
        return {{ first, behind, anew, sent: ws.sent }};
        """,
    )
    assert result["first"] == [1, 2, 3, 4, 5, 8, 9]  # the snapshot was news to it
    assert result["behind"] == list(range(1, 10)), result
    assert result["anew"] == list(range(1, 11)), result
    restart = [
        {"op": "unsubscribe", "task_id": TASK},
        {"op": "subscribe", "task_id": "longhaul-client:sync:1", "after_seq": 0},
        {"op": "subscribe", "task_id": TASK, "after_seq": 0},
    ]
    left = [
        {"op": "unsubscribe", "task_id": TASK},
        {"op": "subscribe", "task_id": "longhaul-client:sync:2", "after_seq": 0},
    ]
    assert result["sent"][1:] == [
        *restart,
        *left,
        {"op": "subscribe", "task_id": TASK, "after_seq": 0},
    ]


async def test_a_refusal_of_a_subscribe_the_client_has_since_repeated_drops_nothing(
    page: Page,
) -> None:
    """A too_many_subscriptions answering a subscribe sent before the task was followed
    anew (a handler behind the others) says nothing of the subscribe after it: the
    gateway may well take that one, and the client goes on following the task (before,
    it forgot the task and told its handlers, while the gateway kept sending its
    events). A refusal of that later subscribe does make it forget the task."""
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const ev = (seq) => ({{ type: "event", task_id: "{TASK}", seq, state: "running" }});
        const refusal = (id) => ({{ type: "error", task_id: id, code: "too_many_subscriptions",
                                    message: "cap" }});
        const a = [], b = [], errors = [], otherErrors = [];
        const onError = (e) => errors.push(e.code);
        client.subscribe("{TASK}", {{ onEvent: (e) => a.push(e.seq), onError, afterSeq: 3 }});
        client.subscribe("{TASK}", {{ onEvent: (e) => b.push(e.seq), onError, afterSeq: 1 }});
        ws.feed(refusal("{TASK}"));                  // the gateway was full at the first
        ws.answerSyncs();
        for (let s = 2; s <= 4; s++) ws.feed(ev(s)); // and had room at the second
        const other = "{OTHER}";
        const onOther = (e) => otherErrors.push(e.code);
        client.subscribe(other, {{ onError: onOther, afterSeq: 3 }});
        client.subscribe(other, {{ onError: onOther, afterSeq: 1 }});
        ws.feed(refusal(other));
        ws.answerSyncs();
        ws.feed(refusal(other));                     // the later subscribe refused too
        ws.drop();
        await until(() => sockets.length === 2);
        sockets[1].open();
        client.close();
        return {{ a, b, errors, otherErrors, resumed: sockets[1].sent }};
        """,
    )
    assert result["a"] == [4] and result["b"] == [2, 3, 4], result
    assert result["errors"] == []
    assert result["otherErrors"] == ["too_many_subscriptions"] * 2  # each handler, once
    assert result["resumed"] == [{"op": "subscribe", "task_id": TASK, "after_seq": 4}]


async def test_a_socket_that_fails_and_never_closes_is_a_failed_connection(page: Page) -> None:
    """A socket that reports an error and then no close (other than one the page's
    policy blocks) is given up after closeWaitMs and reconnected at the backoff, like
    one that closed (before, the status stayed "connecting" for ever); one that
    closes after its error, as is usual, is reconnected once."""
    result = await run(
        page,
        """
        const reported = [];
        const client = new LonghaulClient({
          gatewayUrl: "ws://gw/v1/ws", getToken: async () => "t", baseDelayMs: 1,
          closeWaitMs: 20,
          onStatus: (status, detail) => { if (detail?.delayMs !== undefined) reported.push(detail); },
        });
        await until(() => sockets.length === 1);
        sockets[0].fail();
        await until(() => sockets.length === 2);
        sockets[1].open();
        sockets[1].fail();
        sockets[1].drop();
        await until(() => sockets.length === 3);
        await new Promise((r) => setTimeout(r, 100));  // room for a second reconnect, if any
        const made = sockets.length;
        client.close();
        return { reported, made, states: sockets.map((s) => s.readyState) };
        """,
    )
    first, second = result["reported"]
    assert first["reason"] == "the socket failed and did not close", first
    assert first["attempt"] == 1 and second["attempt"] == 2
    assert second["code"] == 1006
    assert result["made"] == 3
    assert result["states"] == [3, 3, 3]  # the one that never closed is closed by the client


async def test_a_handler_waiting_for_its_sync_resumes_on_the_next_connection(page: Page) -> None:
    """A connection lost before the sync was answered: the next one subscribes the task
    from the lowest seq at once, with nothing of an old subscription on it to wait for."""
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const ev = (seq) => ({{ type: "event", task_id: "{TASK}", seq, state: "running" }});
        const behind = [];
        client.subscribe("{TASK}", {{ afterSeq: 3 }});
        client.subscribe("{TASK}", {{ onEvent: (e) => behind.push(e.seq), afterSeq: 1 }});
        sockets[0].drop();
        await until(() => sockets.length === 2);
        sockets[1].open();
        for (let s = 2; s <= 4; s++) sockets[1].feed(ev(s));
        client.close();
        return {{ behind, resumed: sockets[1].sent }};
        """,
    )
    assert result["resumed"] == [{"op": "subscribe", "task_id": TASK, "after_seq": 1}]
    assert result["behind"] == [2, 3, 4]


async def test_handlers_at_different_seqs_resume_from_the_lowest_after_a_reconnect(
    page: Page,
) -> None:
    """After a dropped connection the task is resubscribed from its lowest handler's seq;
    each handler goes on from its own, and a snapshot (events no longer retained) reaches
    every handler it is news to."""
    result = await run(
        page,
        f"""
        {OPEN_CLIENT}
        const ev = (seq, extra = {{}}) => ({{ type: "event", task_id: "{TASK}", seq, state: "running", ...extra }});
        const a = [], b = [];
        client.subscribe("{TASK}", {{ onEvent: (e) => a.push(e.seq), afterSeq: 4 }});
        client.subscribe("{TASK}", {{ onEvent: (e) => b.push(e.seq), afterSeq: 6 }});
        for (let s = 5; s <= 8; s++) sockets[0].feed(ev(s));
        sockets[0].drop();
        await tick(); await tick(); await tick();
        sockets[1].open();
        const resumed = sockets[1].sent;
        for (let s = 9; s <= 10; s++) sockets[1].feed(ev(s));
        sockets[1].feed(ev(12, {{ snapshot: true }}));
        sockets[1].feed(ev(13));
        client.close();
        return {{ a, b, resumed }};
        """,
    )
    assert result["resumed"] == [{"op": "subscribe", "task_id": TASK, "after_seq": 8}]
    assert result["a"] == [5, 6, 7, 8, 9, 10, 12, 13]
    assert result["b"] == [7, 8, 9, 10, 12, 13]


async def test_a_gateway_that_accepts_then_closes_is_backed_off_from(page: Page) -> None:
    """Opening proves nothing: a gateway that accepts and closes at once (1013: no room,
    a dependency down) is asked again later and later, never at once; the backoff starts
    over only after a connection that lasted (before, every open reset it, and the
    client reconnected, each time with a new token, within 500 ms forever)."""
    result = await run(
        page,
        """
        const reported = [];
        const client = new LonghaulClient({
          gatewayUrl: "ws://gw/v1/ws", getToken: async () => "t", baseDelayMs: 4,
          stableAfterMs: 20, refusedAfter: 100,
          onStatus: (status, detail) => { if (detail?.delayMs !== undefined) reported.push(detail); },
        });
        for (let i = 0; i < 6; i++) {
          await until(() => sockets.length === i + 1);
          sockets[i].open();
          sockets[i].drop(1013, "no room");
        }
        await until(() => sockets.length === 7);
        sockets[6].open();
        await new Promise((r) => setTimeout(r, 300));  // lasts well past stableAfterMs
        sockets[6].drop(1006);
        client.close();
        return reported;
        """,
    )
    assert [d["attempt"] for d in result] == [1, 2, 3, 4, 5, 6, 1], result
    for d in result[:6]:
        assert d["code"] == 1013 and d["reason"] == "no room"
        ceiling = 4 * 2 ** (d["attempt"] - 1)
        assert ceiling / 2 <= d["delayMs"] <= ceiling, d  # "try later": never at once
    assert result[6]["code"] == 1006


async def test_connections_that_never_open_are_reported_refused(page: Page) -> None:
    """A handshake refused (403: an Origin not allowed) reaches the page as a 1006 before
    any open: after refusedAfter of them in a row the status is "refused" (not
    "reconnecting" again and again), the client goes on trying at its backoff, and a
    connection that opens ends it."""
    result = await run(
        page,
        """
        const statuses = [];
        const client = new LonghaulClient({
          gatewayUrl: "ws://gw/v1/ws", getToken: async () => "t", baseDelayMs: 1,
          refusedAfter: 3, onStatus: (status, detail) => statuses.push([status, detail]),
        });
        for (let i = 0; i < 5; i++) {
          await until(() => sockets.length === i + 1);
          sockets[i].drop();
        }
        await until(() => sockets.length === 6);
        sockets[5].open();
        client.close();
        return statuses;
        """,
    )
    names = [s for s, _ in result]
    # Two failures, each told and then its connect; from the third, "refused" until
    # a connection opens.
    assert names == ["connecting", *["reconnecting"] * 4, *["refused"] * 3, "open", "closed"]
    refused = [d for s, d in result if s == "refused"]
    assert [d["failures"] for d in refused] == [3, 4, 5]
    assert all(d["code"] == 1006 for d in refused)


async def test_a_socket_that_cannot_be_made_is_an_error_not_connecting_forever(
    browser: Browser,  # noqa: F811 - the fixture
) -> None:
    """Chromium's own WebSocket, from an https page, refuses a ws:// gateway URL (mixed
    content: the constructor throws a SecurityError; loopback hosts are exempt, hence
    a name), and a malformed URL throws too:
    the status is "error" with the reason, once, with no retry and nothing unhandled
    (before, the rejection vanished and the status stayed "connecting")."""
    page = await browser.new_page()
    origin = "https://client.test"
    await page.route(f"{origin}/**", _serve_client("https"))
    unhandled: list[str] = []
    page.on("pageerror", lambda exc: unhandled.append(str(exc)))
    try:
        await page.goto(f"{origin}/")
        result = await run(
            page,
            """
            const until = async (check) => {
              for (let i = 0; i < 2000 && !check(); i++) await new Promise((r) => setTimeout(r, 5));
            };
            const outcomes = [];
            for (const gatewayUrl of ["ws://gateway.test/v1/ws", "not a url"]) {
              const statuses = [];
              let tokens = 0;
              const client = new LonghaulClient({
                gatewayUrl, baseDelayMs: 1,
                getToken: async () => { tokens += 1; return "t"; },
                onStatus: (status, detail) => statuses.push([status, detail]),
              });
              await until(() => client.status === "error");
              await new Promise((r) => setTimeout(r, 100));  // room for a retry, if any
              outcomes.push({ statuses, tokens });
            }
            return outcomes;
            """,
        )
    finally:
        await page.close()
    mixed, malformed = result
    assert [s for s, _ in mixed["statuses"]] == ["connecting", "error"], mixed
    assert "SecurityError" in mixed["statuses"][-1][1]["message"]
    assert [s for s, _ in malformed["statuses"]] == ["connecting", "error"], malformed
    assert "TypeError" in malformed["statuses"][-1][1]["message"]
    assert mixed["tokens"] == malformed["tokens"] == 1
    assert unhandled == []


async def test_a_socket_the_pages_policy_blocks_is_an_error_not_connecting_forever(
    browser: Browser,  # noqa: F811 - the fixture
) -> None:
    """Chromium's WebSocket to a gateway the page's Content-Security-Policy leaves out of
    connect-src fires "error" and never "close": the status stayed "connecting" for ever.
    It is "error", naming the policy and the origin it blocked, once, with no retry."""
    page = await browser.new_page()
    policy = "default-src 'none'; script-src 'self'; connect-src 'self' ws://gateway.test:8001"
    await page.route(f"{ORIGIN}/**", _serve_client("policy", {"Content-Security-Policy": policy}))
    try:
        await page.goto(f"{ORIGIN}/")
        result = await run(
            page,
            """
            const statuses = [];
            let tokens = 0;
            const client = new LonghaulClient({
              gatewayUrl: "ws://elsewhere.test:8001/v1/ws", baseDelayMs: 1,
              getToken: async () => { tokens += 1; return "t"; },
              onStatus: (status, detail) => statuses.push([status, detail]),
            });
            for (let i = 0; i < 600 && client.status !== "error"; i++) {
              await new Promise((r) => setTimeout(r, 5));
            }
            await new Promise((r) => setTimeout(r, 100));  // room for a retry, if any
            return { statuses, tokens };
            """,
        )
    finally:
        await page.close()
    assert [s for s, _ in result["statuses"]] == ["connecting", "error"], result
    message = result["statuses"][-1][1]["message"]
    assert message == (
        "SecurityError: this page's Content-Security-Policy (connect-src) does not allow"
        " ws://elsewhere.test:8001"
    ), message
    assert result["tokens"] == 1


async def test_a_report_only_policy_is_no_reason_to_give_up(
    browser: Browser,  # noqa: F811 - the fixture
) -> None:
    """A page trialling a Content-Security-Policy-Report-Only that leaves the gateway out
    gets a violation report, but its socket is not blocked: the client goes on as for
    any socket that closes (here: no such host), and never says "error"."""
    page = await browser.new_page()
    policy = "default-src 'none'; script-src 'self'; connect-src 'self'"
    headers = {"Content-Security-Policy-Report-Only": policy}
    await page.route(f"{ORIGIN}/**", _serve_client("report-only", headers))
    try:
        await page.goto(f"{ORIGIN}/")
        result = await run(
            page,
            """
            const statuses = [];
            let reports = 0;
            document.addEventListener("securitypolicyviolation", () => { reports += 1; });
            const client = new LonghaulClient({
              gatewayUrl: "ws://elsewhere.test:8001/v1/ws", baseDelayMs: 1,
              getToken: async () => "t",
              onStatus: (status) => statuses.push(status),
            });
            for (let i = 0; i < 600 && !statuses.includes("reconnecting"); i++) {
              await new Promise((r) => setTimeout(r, 5));
            }
            client.close();
            return { statuses, reports };
            """,
        )
    finally:
        await page.close()
    assert result["reports"] >= 1, result  # the policy did see the socket
    assert "reconnecting" in result["statuses"] and "error" not in result["statuses"], result
