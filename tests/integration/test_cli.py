"""The operator's ``longhaul`` command against the real PostgreSQL and Redis.

``dlq redrive``: the dead letter's task is queued again, once, and whoever watches it
sees it queued at once, not when a worker takes it. No worker runs here, so nothing
else writes the event. ``keys``: a key is listed by its id, never its secret, and
shown revoked once revoked. ``tenants``: a tenant's own rate limit is what the API
applies."""

from __future__ import annotations

from uuid import UUID

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from services.api.repository import ApiRepository, NewTask
from shared import keys
from shared.ids import uuid7
from shared.schemas import ProgressEvent, TaskRequest, TaskState, parse_event
from tests.conftest import ROOT_ENV, Isolated, create_tenant
from tests.support import System, run_cli


async def _dead_lettered(isolated: Isolated) -> tuple[UUID, UUID]:
    """A task that failed as a poison message does (no attempt ran), and its dead letter."""
    db = isolated.db
    task_id, letter_id = uuid7(), uuid7()
    await ApiRepository(db, timeout=10).insert(
        isolated.tenant.id, [NewTask(id=task_id, request=TaskRequest(type="demo.noop"))]
    )
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM outbox WHERE task_id = $1", task_id)
        await conn.execute(
            "UPDATE tasks SET state = 'failed', finished_at = now(), updated_at = now(),"
            " last_seq = last_seq + 1, error = jsonb_build_object('type', 'poison',"
            " 'message', 'dead-lettered', 'retryable', false) WHERE id = $1",
            task_id,
        )
        await conn.execute(
            "INSERT INTO dead_letters (id, tenant_id, task_id, reason, body, attempts)"
            " VALUES ($1, $2, $3, 'delivery_limit', '\\x00'::bytea, 0)",
            letter_id,
            isolated.tenant.id,
            task_id,
        )
    return task_id, letter_id


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return await run_cli({**ROOT_ENV, **env}, *args)


async def _published(watcher: PubSub) -> list[ProgressEvent]:
    """What the channel carried: read until it stays quiet (the subscription's own
    confirmation comes first, as a message of another type)."""
    seen: list[ProgressEvent] = []
    while (message := await watcher.get_message(timeout=1)) is not None:
        if message["type"] == "message":
            seen.append(parse_event(message["data"]))
    return seen


async def test_redrive_queues_the_task_and_announces_it(isolated: Isolated, redis: Redis) -> None:
    dep = isolated.deployment
    task_id, letter_id = await _dead_lettered(isolated)
    watcher = redis.pubsub()
    await watcher.subscribe(dep.wire.event_channel(task_id))
    try:
        code, out, err = await _cli(dep.env(), "dlq", "redrive", str(letter_id))
        assert code == 0, err
        assert out.strip() == f"task {task_id} queued again as attempt 1", out
        row = await isolated.db.fetchrow("SELECT state, last_seq FROM tasks WHERE id = $1", task_id)
        assert row["state"] == "queued"
        outbox = await isolated.db.fetch("SELECT attempt FROM outbox WHERE task_id = $1", task_id)
        assert [r["attempt"] for r in outbox] == [1]
        # In the stream, for clients that subscribe later...
        entries = await redis.xrange(dep.wire.event_stream(task_id))
        stored = [parse_event(fields[b"e"]) for _, fields in entries]
        assert [(e.seq, e.state) for e in stored] == [(row["last_seq"], TaskState.QUEUED)]
        # ...and published to those watching now.
        assert await _published(watcher) == [stored[0]]
    finally:
        await watcher.aclose()

    code, _, err = await _cli(dep.env(), "dlq", "redrive", str(letter_id))
    assert code != 0 and "already redriven" in err, err


async def test_redrive_without_redis_still_queues_the_task(isolated: Isolated) -> None:
    """The redrive is committed first: Redis away costs the event, with a warning, not
    the redrive."""
    task_id, letter_id = await _dead_lettered(isolated)
    env = isolated.deployment.env(redis_url="redis://127.0.0.1:1/0", io_timeout_s="2")
    code, out, err = await _cli(env, "dlq", "redrive", str(letter_id))
    assert code == 0, err
    assert out.strip() == f"task {task_id} queued again as attempt 1", out
    assert "warning: the task's queued event was not written to Redis" in err, err
    state = await isolated.db.fetchval("SELECT state FROM tasks WHERE id = $1", task_id)
    assert state == "queued"


async def test_keys_are_listed_by_id_and_shown_revoked(isolated: Isolated) -> None:
    env = isolated.deployment.env()
    tenant = f"cli-{uuid7().hex[:12]}"
    code, out, err = await _cli(env, "keys", "create", "--tenant", tenant, "--label", "ops")
    assert code == 0, err
    key = out.strip().splitlines()[-1]
    parsed = keys.parse(key)
    assert parsed is not None, key

    async def listed() -> list[str]:
        code, out, err = await _cli(env, "keys", "list", "--tenant", tenant)
        assert code == 0, err
        assert parsed.secret not in out  # never the secret
        return [line for line in out.splitlines() if parsed.key_id in line]

    [line] = await listed()
    assert line.split("\t")[1:2] == [tenant] and line.endswith("\tactive"), line
    # Revoked by the form the listing shows (the secret cut off), as an operator pastes it.
    code, out, err = await _cli(env, "keys", "revoke", line.split("\t")[0])
    assert code == 0 and out.strip() == f"revoked {parsed.key_id}", (out, err)
    [line] = await listed()
    assert line.endswith("\trevoked"), line
    # Again (a retried script, a second operator): nothing changes, and it says so.
    for again in (parsed.key_id, key):
        code, out, err = await _cli(env, "keys", "revoke", again)
        assert (code, out) == (0, f"{parsed.key_id} was already revoked\n"), err
    [line] = await listed()
    assert line.endswith("\trevoked"), line
    code, _, err = await _cli(env, "keys", "revoke", "nosuchkeyid1")
    assert (code, err) == (2, "longhaul: no key with id nosuchkeyid1\n")


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "must not be empty or blank"),
        ("   ", "must not be empty or blank"),
        ("a" * 201, "must be at most 200 characters, not 201"),
        (" acme", "must not start or end with white space"),
        ("ac\tme", "must not hold control characters"),
    ],
)
async def test_a_tenant_name_the_database_would_refuse_or_blank_is_one_line_and_exit_2(
    isolated: Isolated, name: str, says: str
) -> None:
    """It was PostgreSQL's check-constraint error with its DETAIL line and exit 3 (a
    dependency unreachable), or a tenant with a blank name."""
    code, out, err = await _cli(isolated.deployment.env(), "keys", "create", "--tenant", name)
    assert (code, out, err) == (2, "", f"longhaul: --tenant {says}\n")
    names = await isolated.db.fetchval("SELECT array_agg(name) FROM tenants")
    assert names == [isolated.tenant.name]


async def test_a_tenant_name_of_200_characters_is_taken(isolated: Isolated) -> None:
    name = "a" * 199 + "é"  # characters, as the CHECK counts them, not bytes
    code, _, err = await _cli(isolated.deployment.env(), "keys", "create", "--tenant", name)
    assert code == 0, err
    assert await isolated.db.fetchval("SELECT count(*) FROM tenants WHERE name = $1", name) == 1


@pytest.mark.parametrize(
    ("args", "usage", "choices"),
    [
        (
            (),
            "usage: longhaul [-h] {migrate,keys,tenants,dlq,schedules,namespace} ...",
            "{migrate,keys,tenants,dlq,schedules,namespace}",
        ),
        (("tenants",), "usage: longhaul tenants [-h] {list,limit} ...", "{list,limit}"),
        (("keys",), "usage: longhaul keys [-h] {create,revoke,list} ...", "{create,revoke,list}"),
        (("dlq",), "usage: longhaul dlq [-h] {list,redrive} ...", "{list,redrive}"),
        (("schedules",), "usage: longhaul schedules [-h] {list} ...", "{list}"),
        (("namespace",), "usage: longhaul namespace [-h] {delete} ...", "{delete}"),
    ],
)
async def test_a_missing_command_is_told_by_its_choices(
    args: tuple[str, ...], usage: str, choices: str
) -> None:
    """Not by argparse's internal names ("required: command", "keys_command")."""
    code, _, err = await run_cli(ROOT_ENV, *args)
    prog = " ".join(("longhaul", *args))
    assert (code, err.splitlines()) == (
        2,
        [usage, f"{prog}: error: the following arguments are required: {choices}"],
    )


async def test_the_help_is_plain_text() -> None:
    code, out, _ = await run_cli(ROOT_ENV, "--help")
    assert (
        code == 0 and "Operator commands: migrate, keys, tenants, dlq, schedules, namespace." in out
    ), out
    assert "``" not in out


async def test_dlq_list_shows_a_tenants_text_without_its_control_characters(
    isolated: Isolated,
) -> None:
    """A dead letter's detail quotes a handler's error message, which a tenant can
    fill: its line breaks and escape sequences are written out, not obeyed, so the
    listing keeps one line per dead letter."""
    _, letter_id = await _dead_lettered(isolated)
    await isolated.db.execute(
        "UPDATE dead_letters SET detail = $2 WHERE id = $1",
        letter_id,
        "boom\n00000000-fake-line\tdelivery_limit\x1b[2J\x9b",
    )
    code, out, err = await _cli(isolated.deployment.env(), "dlq", "list", "--limit", "500")
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.startswith(str(letter_id))]
    assert line.endswith("boom\\x0a00000000-fake-line\\x09delivery_limit\\x1b[2J\\x9b"), line
    assert "\x1b" not in out and "fake-line" not in out.replace(line, "")


async def test_dlq_list_names_each_dead_letters_tenant(isolated: Isolated) -> None:
    """It lists every tenant's: each line says whose (``-``: a message that named none)."""
    task_id, letter_id = await _dead_lettered(isolated)
    orphan = uuid7()
    await isolated.db.execute(
        "INSERT INTO dead_letters (id, reason, body, attempts)"
        " VALUES ($1, 'malformed', '\\x00'::bytea, 0)",
        orphan,
    )
    code, out, err = await _cli(isolated.deployment.env(), "dlq", "list")
    assert code == 0, err
    lines = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert lines[str(letter_id)][3:5] == [f"tenant={isolated.tenant.name}", f"task={task_id}"]
    assert lines[str(orphan)][3:5] == ["tenant=-", "task=-"]


async def test_schedules_list_shows_each_tenants_schedules_on_a_line_each(
    isolated: Isolated,
) -> None:
    """Every tenant's, or one tenant's with --tenant; a schedule's name is a tenant's
    text, its control characters written out; an unknown tenant is one line, exit 2."""
    db = isolated.db
    other = await create_tenant(db)
    mine, theirs = uuid7(), uuid7()
    for schedule_id, tenant_id, name, enabled in (
        (mine, isolated.tenant.id, "nightly\nfake\x1b[2J", True),
        (theirs, other.id, "hourly", False),
    ):
        await db.execute(
            "INSERT INTO schedules (id, tenant_id, name, cron, type, enabled, next_run_at,"
            " last_error) VALUES ($1, $2, $3, '0 6 * * *', 'demo.noop', $4,"
            " CASE WHEN $4 THEN '2031-05-06 06:00+00'::timestamptz END,"
            " CASE WHEN NOT $4 THEN 'made no task: gone' END)",
            schedule_id,
            tenant_id,
            name,
            enabled,
        )
    env = isolated.deployment.env()
    code, out, err = await _cli(env, "schedules", "list")
    assert code == 0, err
    lines = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert set(lines) == {str(mine), str(theirs)}
    assert lines[str(mine)][1:7] == [
        f"tenant={isolated.tenant.name}",
        "nightly\\x0afake\\x1b[2J",
        "0 6 * * *",
        "demo.noop",
        "enabled",
        "next=2031-05-06 06:00",
    ]
    assert lines[str(theirs)][5:] == ["disabled", "next=-", "last_task=-", "made no task: gone"]
    code, out, err = await _cli(env, "schedules", "list", "--tenant", other.name)
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == [str(theirs)]
    code, out, err = await _cli(env, "schedules", "list", "--tenant", "nobody-" + other.name)
    assert (code, out) == (2, "") and err.startswith("longhaul: no tenant named"), err


async def test_a_key_made_elsewhere_is_registered_once(isolated: Isolated) -> None:
    """``keys create --key``: a key made elsewhere (make up's LONGHAUL_DEV_API_KEY) is
    registered as it is and works; registering it again, a malformed key, or a label
    that is not the key's own are refused with one line and exit 2."""
    env = isolated.deployment.env()
    tenant = f"cli-{uuid7().hex[:12]}"
    given = keys.generate("dev").key
    code, out, err = await _cli(env, "keys", "create", "--tenant", tenant, "--key", given)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == given
    parsed = keys.parse(given)
    assert parsed is not None
    stored = await isolated.db.fetchval(
        "SELECT secret_hash FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL",
        parsed.key_id,
    )
    assert stored is not None and keys.verify(parsed, bytes(stored))
    code, _, err = await _cli(env, "keys", "create", "--tenant", tenant, "--key", given)
    assert code == 2 and f"key id {parsed.key_id} is taken: a key is registered once" in err
    code, _, err = await _cli(env, "keys", "revoke", parsed.key_id)
    assert code == 0, err
    code, _, err = await _cli(env, "keys", "create", "--tenant", tenant, "--key", given)
    assert code == 2 and f"key id {parsed.key_id} is taken: it was revoked" in err, err
    code, _, err = await _cli(env, "keys", "create", "--tenant", tenant, "--key", "lh_x")
    assert code == 2 and "--key is not a Longhaul API key" in err, err
    other = keys.generate("dev").key
    code, _, err = await _cli(
        env, "keys", "create", "--tenant", tenant, "--key", other, "--label", "ops"
    )
    assert code == 2 and "disagrees with the key's own label dev" in err, err


async def test_a_bad_limit_is_refused_before_the_database(isolated: Isolated) -> None:
    code, _, err = await _cli(isolated.deployment.env(), "dlq", "list", "--limit", "-1")
    assert code == 2 and "--limit: must be a whole number of at least 1, not '-1'" in err, err


def _fields(line: str) -> list[str]:
    """A `tenants list` line's fields after the name."""
    return line.split("\t")[1:]


async def test_a_tenants_own_rate_limit_is_set_listed_applied_and_cleared(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """`tenants limit` sets what the API applies to that tenant (here 2 requests, then
    429), `tenants list` shows it, and `--default` gives the tenant the API's own back."""
    env, tenant = isolated.deployment.env(), isolated.tenant

    async def listed() -> str:
        code, out, err = await _cli(env, "tenants", "list")
        assert code == 0, err
        [line] = [line for line in out.splitlines() if line.startswith(f"{tenant.name}\t")]
        return line

    assert _fields(await listed()) == [str(tenant.id), "rate=default", "burst=default",
                                            "active keys=1"]  # fmt: skip
    code, out, err = await _cli(
        env, "tenants", "limit", tenant.name, "--rate", "0.01", "--burst", "2"
    )
    assert code == 0 and "rate=0.01/s, burst=2" in out, err
    assert _fields(await listed())[1:3] == ["rate=0.01/s", "burst=2"]
    system = System(env)
    try:
        await system.start_api()
        statuses = []
        for _ in range(3):
            async with http.get(f"{system.api_url}/v1/tasks", headers=tenant.headers) as r:
                statuses.append(r.status)
    finally:
        system.stop()
    assert statuses == [200, 200, 429]
    code, out, err = await _cli(env, "tenants", "limit", tenant.name, "--default")
    assert code == 0 and "rate=default, burst=default" in out, err
    assert _fields(await listed())[1:3] == ["rate=default", "burst=default"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["limit", "nobody-by-this-name", "--rate", "5"], "no tenant named 'nobody-by-this-name'"),
        (["limit", "x"], "give --rate and/or --burst, or --default alone"),
        (["limit", "x", "--rate", "5", "--default"], "give --rate and/or --burst, or --default"),
        (["limit", "x", "--rate", "0"], "--rate: must be a number above 0, not '0'"),
        (["limit", "x", "--rate", "nan"], "--rate: must be a number above 0, not 'nan'"),
        (["limit", "x", "--burst", "0"], "--burst: must be a whole number of at least 1"),
    ],
)
async def test_a_bad_tenant_limit_is_refused_with_exit_2_saying_why(
    isolated: Isolated, args: list[str], error: str
) -> None:
    code, _, err = await _cli(isolated.deployment.env(), "tenants", *args)
    assert code == 2 and error in err and err.count("\n") <= 3, err
