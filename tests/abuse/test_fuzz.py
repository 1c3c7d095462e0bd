"""Fuzzing: schemathesis against the running API's own OpenAPI document; hypothesis
over the two parsers that read untrusted bytes (task messages, WebSocket frames); and
malformed messages published straight to the task queue, which must end as dead
letters while the worker lives on."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import aio_pika
import aiohttp
import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ws_gateway import frames
from shared.errors import MessageError
from shared.ids import uuid7
from shared.schemas import TaskMessage, parse_task_message
from tests.abuse.conftest import TASKS_MODULE, MakeSystem, request
from tests.conftest import ROOT_ENV, Deployment, create_tenant
from tests.support import ARTIFACTS, eventually

SCHEMATHESIS = str(Path(sys.executable).parent / "st")
CONFIG = Path(__file__).with_name("schemathesis.toml")
# Seconds of generated requests: about 3,000 in CI's run; LONGHAUL_FUZZ_BUDGET_S=300 digs
# deeper (with LONGHAUL_FUZZ_SEED for other inputs).
FUZZ_BUDGET_S = float(os.environ.get("LONGHAUL_FUZZ_BUDGET_S", "25"))
# Checks that cannot apply to this API, and why:
# - positive_data_acceptance expects every schema-valid request to succeed. Two server
#   facts are beyond what a schema can say, and the contract answers both with 422: a
#   task `type` must be one a worker registered (discovered at run time), and a list
#   `cursor` must be one the server issued (it is opaque).
EXCLUDED_CHECKS = "positive_data_acceptance"

# ---------------------------------------------------------------- schemathesis


async def test_schemathesis_finds_no_server_error_or_schema_violation(
    deployment: Deployment, systems: MakeSystem, db: asyncpg.Pool
) -> None:
    """Thousands of generated requests (valid and invalid) across every operation: no
    5xx, and every response conforms to the document (status, headers, body, type)."""
    system = systems(deployment)
    api = await system.start_api(rate_limit_per_s="0")
    tenant = await create_tenant(db)
    report_dir = ARTIFACTS / "schemathesis"
    report_dir.mkdir(parents=True, exist_ok=True)
    seed = os.environ.get("LONGHAUL_FUZZ_SEED", "20261123")
    proc = await asyncio.create_subprocess_exec(
        SCHEMATHESIS,
        "--config-file",
        str(CONFIG),
        "run",
        f"{system.api_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {tenant.key}",
        "--checks",
        "all",
        "--exclude-checks",
        EXCLUDED_CHECKS,
        "--max-examples",
        "300",
        "--max-time",
        f"{FUZZ_BUDGET_S:g}",
        "--seed",
        seed,
        "--workers",
        "2",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
        # Its crash cache (.schemathesis/) goes with the report, not into the work tree.
        cwd=report_dir,
        env={**ROOT_ENV, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await proc.communicate()
    finally:
        # Delayed tasks the fuzzer submitted would otherwise be published when due, by
        # whichever test's relay runs then, into that test's queue; its schedules would
        # be fired by whichever test's worker runs when they come due.
        await db.execute(
            "DELETE FROM outbox o USING tasks t WHERE t.id = o.task_id AND t.tenant_id = $1",
            tenant.id,
        )
        await db.execute("DELETE FROM schedules WHERE tenant_id = $1", tenant.id)
    text = out.decode(errors="replace")
    (report_dir / "output.txt").write_text(text)
    summary = [line.strip() for line in text.splitlines() if "generated" in line]
    print(f"schemathesis (seed {seed}): {summary[-1] if summary else '?'}")
    assert proc.returncode == 0, text[-6000:]
    assert api.alive()
    assert "unhandled error" not in api.output()


# ---------------------------------------------------------------- parsers

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
UUIDISH = st.uuids().map(str) | st.text(max_size=40) | st.integers() | st.none()
MESSAGE_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, 0, True, "1", None, 1.0]),
        "task_id": UUIDISH,
        "tenant_id": UUIDISH,
        "type": st.text(max_size=140) | st.integers(),
        "attempt": st.integers() | st.text(max_size=3),
        "trace_id": st.text(max_size=80) | st.none(),
        "extra": JSON,
    },
)
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _dumps(value: Any) -> bytes:
    # The standard library's encoder: it writes integers of any size, as a foreign
    # producer might, where orjson refuses those past 64 bits.
    return json.dumps(value).encode()


@FUZZ
@given(st.binary(max_size=300) | JSON.map(_dumps) | MESSAGE_LIKE.map(_dumps))
def test_task_message_parser_never_raises_anything_else(body: bytes) -> None:
    """Any bytes parse to a TaskMessage or raise a MessageError naming why."""
    try:
        message = parse_task_message(body)
    except MessageError as exc:
        assert exc.reason and str(exc)
    else:
        assert isinstance(message, TaskMessage) and message.v == 1


FRAME_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["subscribe", "unsubscribe", "SUBSCRIBE", "", None, 1]),
        "task_id": UUIDISH,
        "after_seq": st.integers() | st.booleans() | st.floats() | st.text(max_size=5),
        "x": JSON,
    },
)


@FUZZ
@given(
    st.text(max_size=300)
    | st.binary(max_size=300)
    | JSON.map(lambda v: _dumps(v).decode())
    | FRAME_LIKE.map(lambda v: _dumps(v).decode())
)
def test_gateway_frame_parser_never_crashes(frame: str | bytes) -> None:
    """Any client frame becomes a command or an error answer, never an exception."""
    op = frames.parse_client_frame(frame)
    assert isinstance(op, frames.Subscribe | frames.Unsubscribe | frames.BadRequest)
    if isinstance(op, frames.BadRequest):
        answer = orjson.loads(frames.error_frame(op.code, op.message, op.task_id))
        assert answer["type"] == "error" and answer["code"] in {"bad_request", "not_found"}
    elif isinstance(op, frames.Subscribe):
        assert op.after_seq >= 0


# ---------------------------------------------------------------- poison on the queue


async def test_malformed_messages_on_the_queue_become_dead_letters(
    fresh_namespace: Deployment,
    systems: MakeSystem,
    http: aiohttp.ClientSession,
    db: asyncpg.Pool,
) -> None:
    """Random bytes, JSON of the wrong shape, a huge body and a forged message published
    straight to the task queue all land in dead_letters; the worker keeps working, and
    a forged message naming another tenant's task shows nothing of that task."""
    system = systems(fresh_namespace)
    await system.start_api(rate_limit_per_s="0")
    worker = await system.start_worker("--tasks", TASKS_MODULE)
    a, b = await create_tenant(db), await create_tenant(db)
    url = f"{system.api_url}/v1/tasks"
    marker = f"a-secret-{uuid4().hex}"
    status, raw, _ = await request(
        http,
        "POST",
        url,
        json={"type": "abuse.echo", "args": {"marker": marker, "fail": True}},
        headers=a.headers,
    )
    assert status == 202
    a_task = orjson.loads(raw)["id"]

    async def a_failed() -> bool:
        _, body, _ = await request(http, "GET", f"{url}/{a_task}", headers=a.headers)
        return bool(orjson.loads(body)["state"] == "failed")

    await eventually(a_failed, within=30, what="A's task to fail")

    tag = uuid4().hex
    good = {"v": 1, "task_id": str(uuid7()), "tenant_id": str(b.id), "type": "demo.noop"}
    # Forged: tenant B's id on tenant A's task.
    forged_body = _dumps({**good, "attempt": 2, "task_id": a_task})
    bodies = [
        os.urandom(64),
        b"",
        b"\xff\xfe" + tag.encode(),
        f"not json {tag}".encode(),
        b"null",
        b"[1, 2, 3]",
        _dumps({"v": 2, "tag": tag}),
        _dumps({"v": True, "tag": tag}),
        _dumps({"v": 1, "tag": tag}),
        _dumps({**good, "attempt": 0}),
        _dumps({**good, "attempt": 1, "task_id": f"nope-{tag}"}),
        _dumps({**good, "attempt": 1, "type": "t" * 300}),
        _dumps({**good, "attempt": 1, "unexpected": tag}),
        _dumps({**good, "attempt": 2**80}),
        # Well formed, but no such task: kept as a dead letter, not silently dropped.
        _dumps({**good, "attempt": 1}),
        forged_body,
        b'{"v": 1, "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}',
        os.urandom(2 * 1024 * 1024),
    ]
    connection = await aio_pika.connect(fresh_namespace.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for i, body in enumerate(bodies):
            headers: dict[str, Any] = {
                "odd": bytearray(b"\xff\x00"),
                "n": i,
                "nested": {"l": [1, "2"]},
            }
            await channel.default_exchange.publish(
                aio_pika.Message(body, headers=headers, message_id=f"poison-{i}"),
                routing_key=fresh_namespace.wire.tasks_queue,
            )
    finally:
        await connection.close()
    started = time.monotonic()

    async def all_dead() -> list[asyncpg.Record] | None:
        rows = await db.fetch(
            "SELECT body, reason, tenant_id, task_id, attempts, last_error, detail "
            "FROM dead_letters WHERE body = ANY($1::bytea[])",
            bodies,
        )
        return rows if {bytes(r["body"]) for r in rows} == set(bodies) else None

    rows = await eventually(all_dead, within=60, interval=0.2, what="every poison dead-lettered")
    print(
        f"{len(bodies)} poison messages dead-lettered in {time.monotonic() - started:.2f}s; "
        f"reasons: {sorted({r['reason'] for r in rows})}"
    )
    assert worker.alive()
    assert "Traceback" not in worker.output()

    # The forged message is B's dead letter now; it must not carry A's task's data, nor
    # name A's task (a redrive would run it, or tell B whether it exists).
    forged = next(r for r in rows if bytes(r["body"]) == forged_body)
    assert (forged["tenant_id"], forged["task_id"]) == (b.id, None), dict(forged)
    _, raw, _ = await request(http, "GET", f"{system.api_url}/v1/dead-letters", headers=b.headers)
    assert marker not in raw.decode(), "B's dead letters show A's task error"
    assert forged["last_error"] is None and forged["attempts"] is None, dict(forged)
    letter_id = await db.fetchval("SELECT id FROM dead_letters WHERE body = $1", forged_body)
    redrive = f"{system.api_url}/v1/dead-letters/{letter_id}/redrive"
    status, raw, _ = await request(http, "POST", redrive, headers=b.headers)
    assert status == 409 and "no task to run again" in raw.decode(), raw

    # And the worker still runs real work.
    status, raw, _ = await request(http, "POST", url, json={"type": "demo.noop"}, headers=b.headers)
    assert status == 202
    task_id = orjson.loads(raw)["id"]

    async def succeeded() -> bool:
        _, body, _ = await request(http, "GET", f"{url}/{task_id}", headers=b.headers)
        return bool(orjson.loads(body)["state"] == "succeeded")

    await eventually(succeeded, within=30, what="a real task after the poison")
