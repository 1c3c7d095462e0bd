"""A service that cannot start says why in one line on stderr and exits non-zero:
2 for a configuration error, 3 for a dependency it cannot reach."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from services.api.repository import ApiRepository, NewTask
from shared import amqp
from shared.db import migrations
from shared.ids import uuid7
from shared.schemas import TaskRequest
from shared.settings import CommonSettings
from tests.conftest import ROOT_ENV, Deployment, Isolated, scratch_database
from tests.faults.private import PrivateRabbit, PrivateRedis
from tests.faults.proxy import ClosingListener, CutProxy, SilentAmqpProxy
from tests.support import ServiceProcess, System, run_cli, timeout


def _exit(proc: ServiceProcess) -> tuple[int, list[str]]:
    """The exit code and what the process wrote that is not a JSON log line."""
    try:
        code = proc.proc.wait(timeout=timeout(60))
    finally:
        proc.terminate()
    return code, [line for line in proc.output().splitlines() if not line.startswith("{")]


def _errors_logged(proc: ServiceProcess) -> list[dict[str, Any]]:
    """The JSON log lines at error level or above (the process has ended)."""
    logged = [orjson.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    return [r for r in logged if r["level"] in ("error", "critical")]


@pytest.mark.parametrize(
    ("service", "setting", "names"),
    [
        ("api", "api_port", "LONGHAUL_API_HOST/_PORT"),
        ("ws_gateway", "gateway_port", "LONGHAUL_GATEWAY_HOST/_PORT"),
        ("worker", "worker_metrics_port", "LONGHAUL_WORKER_METRICS_HOST/_PORT"),
    ],
)
async def test_a_port_in_use_is_one_line_and_exit_code_2(
    deployment: Deployment, service: str, setting: str, names: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ServiceProcess(f"services.{service}", deployment.env(**{setting: str(port)}))
        code, lines = await asyncio.to_thread(_exit, proc)
    assert (code, lines) == (
        2,
        [f"{service}: cannot listen on 127.0.0.1:{port} ({names}): Address already in use"],
    )
    # The API's queue monitor, started before the port is bound and stopped by the
    # failed start, was logged as an essential task that ended (critical) before this.
    assert _errors_logged(proc) == []


async def test_an_allow_list_no_client_could_pass_is_one_line_and_exit_code_2(
    deployment: Deployment,
) -> None:
    """No origin listed and a missing Origin refused: it started, then refused every
    connection with 403."""
    env = deployment.env(allowed_origins=" , ", allow_missing_origin="false")
    proc = ServiceProcess("services.ws_gateway", env)
    code, lines = await asyncio.to_thread(_exit, proc)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("ws_gateway: invalid configuration: LONGHAUL_ALLOWED_ORIGINS: ")


async def test_a_host_that_does_not_resolve_is_named_with_the_resolvers_reason(
    deployment: Deployment,
) -> None:
    proc = ServiceProcess("services.api", deployment.env(api_host="999.1.1.1", api_port="0"))
    code, lines = await asyncio.to_thread(_exit, proc)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("api: cannot listen on 999.1.1.1:0 (LONGHAUL_API_HOST/_PORT): ")
    assert "Unknown error" not in lines[0], lines  # the resolver's own words


@pytest.mark.parametrize(
    ("dependency", "setting", "url"),
    [("Redis", "redis_url", "redis://{}/0"), ("RabbitMQ", "amqp_url", "amqp://guest:guest@{}/")],
)
async def test_an_unreachable_dependency_is_one_line_and_exit_code_3(
    deployment: Deployment, dependency: str, setting: str, url: str
) -> None:
    """A port nobody listens on: the line says the connection was refused (the broker's
    once read as closed during the AMQP handshake)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        env = deployment.env(**{setting: url.format(f"127.0.0.1:{port}")}, start_timeout_s="1")
        code, lines = await asyncio.to_thread(_exit, ServiceProcess("services.api", env))
    assert code == 3
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"api: {dependency} unreachable for 1s (LONGHAUL_START_TIMEOUT_S): ")
    assert "Connection refused" in lines[0] and "handshake" not in lines[0], lines


async def test_a_broker_port_that_never_answers_is_one_line_and_exit_code_3(
    deployment: Deployment, ports: dict[str, str]
) -> None:
    """Something listens there and never answers (a hung broker, a proxy without its
    backend) past the start timeout: the connect it cut short left aio-pika
    reconnecting for ever, which held up the process's exit, SIGTERM or not."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete; nothing ever reads them
        env = deployment.env(
            **ports,
            amqp_url=f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/",
            start_timeout_s="1",
        )
        code, lines = await asyncio.to_thread(_exit, ServiceProcess("services.api", env))
    assert (code, lines) == (
        3,
        ["api: RabbitMQ unreachable for 1s (LONGHAUL_START_TIMEOUT_S): TimeoutError"],
    )


def _output_has(proc: ServiceProcess, text: str) -> None:
    """Wait until the process has written ``text`` (a log line of its start)."""
    deadline = time.monotonic() + timeout(30)
    while text not in proc.output():
        assert proc.alive() and time.monotonic() < deadline, proc.output()
        time.sleep(0.05)


def _accepted(listener: socket.socket) -> socket.socket:
    """The first connection to ``listener`` (within 30 s), which nothing answers."""
    listener.settimeout(timeout(30))
    return listener.accept()[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_while_waiting_for_a_dependency_is_a_stop_not_its_failure(
    deployment: Deployment, ports: dict[str, str], signum: signal.Signals
) -> None:
    """Stopped between two tries (Redis refuses connections) or in the middle of one (a
    broker port that never answers): the process exits at once as any stop does, and
    says for what it waited. It went on waiting, then said "unreachable", exit code 3."""
    with socket.socket() as closed, socket.socket() as silent:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = deployment.env(
            **ports,
            redis_url=f"redis://127.0.0.1:{closed.getsockname()[1]}/0",
        )
        api = ServiceProcess("services.api", env)
        await asyncio.to_thread(_output_has, api, "waiting for Redis: ")
        api.proc.send_signal(signum)
        env = deployment.env(
            **ports,
            amqp_url=f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/",
            io_timeout_s="60",  # the connect would wait for the whole start timeout
        )
        worker = ServiceProcess("services.worker", env)
        with await asyncio.to_thread(_accepted, silent):
            worker.proc.send_signal(signum)
            results = [await asyncio.to_thread(_exit, proc) for proc in (api, worker)]
    assert results == [
        (0, ["api: stopped while waiting for Redis"]),
        (0, ["worker: stopped while waiting for RabbitMQ"]),
    ]


@pytest.mark.parametrize(
    ("service", "url", "refused"),
    [
        ("api", "amqp://guest:wrong-password@127.0.0.1:5672/", "refused the login"),
        ("worker", "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "the virtual host"),
    ],
)
async def test_a_login_or_vhost_the_broker_refuses_is_one_line_and_exit_code_2(
    deployment: Deployment, service: str, url: str, refused: str
) -> None:
    """Not a wait for the start timeout ending in "unreachable": no wait mends them."""
    env = deployment.env(amqp_url=url, start_timeout_s="60")
    code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{service}: RabbitMQ at amqp://guest:") and refused in lines[0]
    assert "wrong-password" not in lines[0]


async def test_a_login_postgresql_refuses_is_one_line_and_exit_code_2(
    deployment: Deployment, ports: dict[str, str]
) -> None:
    """A role that does not exist: no wait mends it (it waited for the start timeout,
    then said "PostgreSQL unreachable", exit code 3). `longhaul migrate`, which waits for
    PostgreSQL too, says the same at once."""
    role = f"lh_nobody_{deployment.run_id}"
    url = urlsplit(deployment.database_url)
    dsn = url._replace(netloc=f"{role}@{url.hostname}:{url.port or 5432}").geturl()
    env = deployment.env(**ports, database_url=dsn, start_timeout_s="60")
    code, lines = await asyncio.to_thread(_exit, ServiceProcess("services.ws_gateway", env))
    says = (
        f'PostgreSQL at {dsn} refused the login (role "{role}" does not exist): check the'
        " user and password in LONGHAUL_DATABASE_URL"
    )
    assert (code, lines) == (2, [f"ws_gateway: {says}"])
    returncode, _, err = await run_cli({**ROOT_ENV, **env}, "migrate")
    assert (returncode, err) == (2, f"longhaul: {says}\n")


async def test_a_user_without_the_grants_is_one_line_and_exit_code_2(
    deployment: Deployment, db: asyncpg.Pool, ports: dict[str, str]
) -> None:
    """A role PostgreSQL lets in, without the grants on Longhaul's tables: no wait
    mends them (it said "PostgreSQL: ..." with exit code 3; before, a traceback)."""
    role = f"lh_nogrants_{deployment.run_id}"
    await db.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        url = urlsplit(deployment.database_url)
        dsn = url._replace(netloc=f"{role}@{url.hostname}:{url.port or 5432}").geturl()
        env = deployment.env(**ports, database_url=dsn)
        code, lines = await asyncio.to_thread(_exit, ServiceProcess("services.ws_gateway", env))
    finally:
        await db.execute(f'DROP ROLE "{role}"')
    assert (code, lines) == (
        2,
        [
            "ws_gateway: PostgreSQL refused the user of LONGHAUL_DATABASE_URL: schema version"
            " not read: permission denied for table schema_migrations"
        ],
    )


@pytest.mark.parametrize(
    ("service", "password", "database", "says"),
    [
        ("api", None, 0, "refused the login (Authentication required.)"),
        ("worker", "wrong", 0, "refused the login (invalid username-password pair"),
        ("ws_gateway", "right", 99, "has no such database (DB index is out of range)"),
    ],
)
async def test_a_password_or_database_redis_refuses_is_one_line_and_exit_code_2(
    deployment: Deployment,
    ports: dict[str, str],
    service: str,
    password: str | None,
    database: int,
    says: str,
) -> None:
    """No wait mends them (it waited for the start timeout, then said "Redis
    unreachable", exit code 3); the password is not shown."""
    with PrivateRedis("--requirepass", "right") as server:
        login = "" if password is None else f":{password}@"
        env = deployment.env(
            **ports,
            redis_url=f"redis://{login}127.0.0.1:{server.port}/{database}",
            start_timeout_s="60",
        )
        code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert (code, len(lines)) == (2, 1), lines
    shown = "" if password is None else ":***@"
    assert lines[0].startswith(
        f"{service}: Redis at redis://{shown}127.0.0.1:{server.port}/{database} {says}"
    ), lines


@pytest.mark.parametrize(
    ("service", "denied", "command"),
    [
        ("api", "-ping", "PING"),
        ("worker", "-ping", "PING"),
        ("ws_gateway", "-psubscribe", "PSUBSCRIBE"),
        ("ws_gateway", "resetchannels", "PSUBSCRIBE"),  # the command, not its channels
        ("worker", "-subscribe", "SUBSCRIBE"),  # the control channel: cancellations
        ("worker", "resetchannels", "SUBSCRIBE"),
    ],
)
async def test_a_command_a_redis_acl_refuses_is_one_line_and_exit_code_2(
    deployment: Deployment, ports: dict[str, str], service: str, denied: str, command: str
) -> None:
    """A user of the shared Redis whose ACL refuses a command the start needs (NOPERM):
    no wait mends it (it waited for the start timeout, then said "Redis unreachable" or
    "could not subscribe", exit code 3)."""
    user = f"lh_acl_{deployment.run_id}_{secrets.token_hex(3)}"
    admin = Redis.from_url(deployment.redis_url)
    await admin.execute_command(
        "ACL", "SETUSER", user, "on", ">secret", "~*", "&*", "+@all", denied
    )
    try:
        url = urlsplit(deployment.redis_url)
        redis_url = url._replace(netloc=f"{user}:secret@{url.netloc}").geturl()
        env = deployment.env(**ports, redis_url=redis_url, start_timeout_s="60")
        code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()
    assert (code, len(lines)) == (2, 1), lines
    assert lines[0].startswith(
        f"{service}: Redis at redis://{user}:***@{url.netloc}{url.path} refused {command}"
    ), lines
    # Redis's own reason follows, in its version's words.
    assert " to the user of LONGHAUL_REDIS_URL (" in lines[0], lines
    assert lines[0].endswith("): its ACL must allow it"), lines


@pytest.mark.parametrize("service", ["api", "worker"])
async def test_queue_arguments_unlike_the_declared_ones_are_one_line_and_exit_code_2(
    fresh_namespace: Deployment, ports: dict[str, str], service: str
) -> None:
    """The namespace's task queue exists with LONGHAUL_DELIVERY_LIMIT=50 (another
    instance declared it): a service started with 3 says which settings to fix."""
    connection = await aio_pika.connect(fresh_namespace.amqp_url)
    try:
        settings = CommonSettings(namespace=fresh_namespace.namespace, delivery_limit=50)
        await amqp.declare(await connection.channel(), settings, fresh_namespace.wire)
    finally:
        await connection.close()
    env = fresh_namespace.env(**ports, delivery_limit="3")
    code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert (code, len(lines)) == (2, 1), lines
    queue = fresh_namespace.wire.tasks_queue
    assert lines[0].startswith(
        f"{service}: queue {queue} refuses these settings: LONGHAUL_DELIVERY_LIMIT and"
        " LONGHAUL_QUEUE_MAX_LENGTH must match what it was declared with (PRECONDITION_FAILED"
    ), lines
    assert "inequivalent arg 'x-delivery-limit'" in lines[0], lines


@pytest.mark.parametrize(
    ("service", "arguments", "says"),
    [
        ("api", {}, "is a classic queue, not the quorum queue this code declares: delete it"),
        ("worker", {}, "is a classic queue, not the quorum queue this code declares: delete it"),
        ("worker", {"x-queue-type": "stream"}, "is a stream queue, not the quorum queue"),
        ("worker", {"x-queue-type": "quorum"}, "exists with other arguments than this code"),
    ],
)
async def test_a_task_queue_of_another_type_is_named_so_and_exit_code_2(
    fresh_namespace: Deployment,
    ports: dict[str, str],
    service: str,
    arguments: dict[str, str],
    says: str,
) -> None:
    """The namespace's task queue exists as a classic queue (another program declared
    it): the line said its delivery limit was to match (the broker names the first
    argument that differs, a dead-letter one), not that the queue is of another type.
    A quorum queue without Longhaul's arguments is no setting to match either."""
    queue = fresh_namespace.wire.tasks_queue
    connection = await aio_pika.connect(fresh_namespace.amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=arguments)
    finally:
        await connection.close()
    env = fresh_namespace.env(**ports)
    code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert (code, len(lines)) == (2, 1), lines
    assert lines[0].startswith(f"{service}: queue {queue} {says}"), lines
    if not arguments:
        assert lines[0].endswith(
            "(move its messages elsewhere first), or set another LONGHAUL_NAMESPACE"
        ), lines


@pytest.mark.parametrize(("service", "kind"), [("api", "queue"), ("worker", "exchange")])
async def test_a_dead_letter_queue_or_exchange_declared_otherwise_is_one_line_and_exit_code_2(
    fresh_namespace: Deployment, ports: dict[str, str], service: str, kind: str
) -> None:
    """Declared by another program (or version) in the namespace, not as Longhaul
    declares them: the broker refuses the declare. It was a traceback."""
    wire = fresh_namespace.wire
    connection = await aio_pika.connect(fresh_namespace.amqp_url)
    try:
        channel = await connection.channel()
        if kind == "queue":
            name = wire.dead_letter_queue
            await channel.declare_queue(name, durable=True)  # classic, not a quorum queue
        else:
            name = wire.tasks_exchange
            await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    finally:
        await connection.close()
    env = fresh_namespace.env(**ports)
    code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert (code, len(lines)) == (2, 1), lines
    assert lines[0].startswith(
        f"{service}: {kind} {name} exists with other arguments than this code declares"
        " (PRECONDITION_FAILED - inequivalent arg "
    ), lines


async def test_a_user_the_broker_does_not_let_declare_is_one_line_and_exit_code_2(
    deployment: Deployment, ports: dict[str, str]
) -> None:
    """A broker of the test's own, whose user may read and write but not declare
    (configure): no wait mends permissions. It was a traceback."""
    broker = PrivateRabbit()
    try:
        await asyncio.to_thread(broker.start)
        for command in (
            ("add_user", "limited", "secret"),
            ("set_permissions", "-p", "/", "limited", "^$", ".*", ".*"),
        ):
            done = await asyncio.to_thread(broker.ctl, *command)
            assert done.returncode == 0, done.stderr
        env = deployment.env(**ports, amqp_url=f"amqp://limited:secret@127.0.0.1:{broker.port}/")
        for service in ("api", "worker"):
            proc = ServiceProcess(f"services.{service}", env)
            code, lines = await asyncio.to_thread(_exit, proc)
            assert (code, len(lines)) == (2, 1), lines
            assert lines[0].startswith(
                f"{service}: RabbitMQ refused the user of LONGHAUL_AMQP_URL (ACCESS_REFUSED -"
                f" access to exchange '{deployment.wire.dead_letter_exchange}' in vhost '/'"
                " refused for user 'limited')"
            ), lines
    finally:
        await asyncio.to_thread(broker.close)


def _amqp_through(deployment: Deployment, port: int) -> str:
    """The deployment's RabbitMQ URL with a proxy's port in it."""
    url = urlsplit(deployment.amqp_url)
    return url._replace(netloc=f"{url.netloc.rsplit(':', 1)[0]}:{port}").geturl()


@pytest.mark.parametrize("service", ["api", "worker"])
async def test_a_broker_silent_once_connected_is_one_line_and_exit_code_3(
    deployment: Deployment, ports: dict[str, str], service: str
) -> None:
    """The connection opens, then the broker answers nothing (a partition that drops
    packets): the declares are given LONGHAUL_IO_TIMEOUT_S. They waited for ever."""
    async with SilentAmqpProxy(urlsplit(deployment.amqp_url).port or 5672) as proxy:
        env = deployment.env(
            **ports, amqp_url=_amqp_through(deployment, proxy.port), io_timeout_s="1"
        )
        code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert (code, lines) == (
        3,
        [f"{service}: RabbitMQ: topology not declared within 1s (LONGHAUL_IO_TIMEOUT_S)"],
    )


@pytest.mark.parametrize(("service", "reset"), [("api", False), ("api", True), ("worker", False)])
async def test_a_port_that_closes_each_connection_in_the_handshake_is_said_so_and_exit_code_3(
    deployment: Deployment, ports: dict[str, str], service: str, reset: bool
) -> None:
    """Each connection is accepted, then closed (or reset) before the AMQP handshake
    ends: each try and the line said "StopAsyncIteration" (a close that came before the
    first read), or aiormq's words, depending on when the close came."""
    says = "ConnectionError: the broker closed or reset the connection during the AMQP handshake"
    with ClosingListener(reset=reset) as listener:
        env = deployment.env(
            **ports,
            amqp_url=f"amqp://guest:guest@127.0.0.1:{listener.port}/",
            start_timeout_s="2",
        )
        proc = ServiceProcess(f"services.{service}", env)
        code, lines = await asyncio.to_thread(_exit, proc)
    assert (code, lines) == (
        3,
        [f"{service}: RabbitMQ unreachable for 2s (LONGHAUL_START_TIMEOUT_S): {says}"],
    )
    logged = [orjson.loads(line)["msg"] for line in proc.output().splitlines() if line[:1] == "{"]
    tries = [msg for msg in logged if msg.startswith("waiting for RabbitMQ")]
    assert tries and set(tries) == {f"waiting for RabbitMQ: {says}"}, tries


async def test_a_broker_that_refuses_the_relays_own_connection_is_one_line_and_exit_code_3(
    deployment: Deployment, ports: dict[str, str]
) -> None:
    """The worker's first connection passes, its outbox relay's own (the second) is
    refused: waited for as the first one is, then named. It was a traceback at once."""
    async with CutProxy(urlsplit(deployment.amqp_url).port or 5672, let_through=1) as proxy:
        env = deployment.env(
            **ports, amqp_url=_amqp_through(deployment, proxy.port), start_timeout_s="1"
        )
        code, lines = await asyncio.to_thread(_exit, ServiceProcess("services.worker", env))
    assert (code, len(lines)) == (3, 1), lines
    assert lines[0].startswith(
        "worker: RabbitMQ (the outbox relay's connection) unreachable for 1s"
        " (LONGHAUL_START_TIMEOUT_S): "
    ), lines


@pytest.mark.parametrize(
    ("service", "table", "failed"),
    [
        ("api", "schema_migrations", "schema version not read"),
        ("ws_gateway", "schema_migrations", "schema version not read"),
        ("worker", "task_types", "task types not registered"),
    ],
)
async def test_a_statement_of_the_start_postgresql_cancels_is_one_line_and_exit_code_3(
    deployment: Deployment,
    db: asyncpg.Pool,
    ports: dict[str, str],
    service: str,
    table: str,
    failed: str,
) -> None:
    """A table the start reads or writes stays locked (a long migration holds it) past
    the statement timeout, LONGHAUL_IO_TIMEOUT_S. It was a traceback."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        env = deployment.env(**ports, io_timeout_s="1")
        code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert (code, lines) == (
        3,
        [
            f"{service}: PostgreSQL: {failed}: QueryCanceledError: canceling statement due to"
            " statement timeout"
        ],
    )


async def test_a_task_type_name_the_api_refuses_stops_the_worker_with_one_line(
    deployment: Deployment, ports: dict[str, str], tmp_path: Path
) -> None:
    """It started, registered and listed the type, whose tasks the API then refused."""
    (tmp_path / "lh_bad_type_name.py").write_text(
        "from services.worker.sdk import task\n\n"
        "@task('Bad Name!')\nasync def bad(ctx, args):\n    return None\n"
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**deployment.env(**ports), "PYTHONPATH": path}
    proc = ServiceProcess("services.worker", env, ["--tasks", "lh_bad_type_name"])
    code, lines = await asyncio.to_thread(_exit, proc)
    assert (code, lines) == (
        2,
        [
            "worker: --tasks lh_bad_type_name: cannot import: TypeError: @task('Bad Name!') on"
            " lh_bad_type_name.bad: not a task type name (1 to 128 characters of A-Z a-z 0-9"
            " _ . : -, the first not . : or -)"
        ],
    )


@pytest.fixture
async def bare_database(deployment: Deployment) -> AsyncIterator[str]:
    """An existing database of this run that was never migrated; dropped afterwards."""
    async with scratch_database(f"{deployment.namespace}_bare", create=True) as url:
        yield url


@pytest.mark.parametrize("service", ["api", "worker", "ws_gateway"])
async def test_an_unmigrated_database_is_one_line_and_exit_code_2(
    fresh_namespace: Deployment, bare_database: str, ports: dict[str, str], service: str
) -> None:
    env = fresh_namespace.env(**ports, database_url=bare_database)
    code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    assert (code, len(lines)) == (2, 1), lines
    latest = migrations()[-1].version
    assert lines[0] == (
        f"{service}: the database is not migrated (schema version 0, this code needs"
        f" {latest}): run `longhaul migrate` first"
    ), lines


@pytest.fixture
async def missing_database(deployment: Deployment) -> AsyncIterator[str]:
    """The URL of a database of this run that does not exist (dropped afterwards, should
    the code under test create it)."""
    async with scratch_database(f"{deployment.namespace}_missing", create=False) as url:
        yield url


@pytest.mark.parametrize("service", ["api", "worker", "ws_gateway"])
async def test_a_missing_database_is_one_line_and_exit_code_2(
    fresh_namespace: Deployment, missing_database: str, ports: dict[str, str], service: str
) -> None:
    """Not an outage to wait out for the start timeout (it said "PostgreSQL unreachable"
    after it, exit 3): the same fix as an unmigrated database, told at once."""
    env = fresh_namespace.env(**ports, database_url=missing_database)
    code, lines = await asyncio.to_thread(_exit, ServiceProcess(f"services.{service}", env))
    name = missing_database.rsplit("/", 1)[1]
    assert (code, lines) == (
        2,
        [f'{service}: database "{name}" does not exist: run `longhaul migrate` first'],
    )


async def test_the_cli_names_migrate_for_a_missing_or_unmigrated_database(
    deployment: Deployment, missing_database: str, bare_database: str
) -> None:
    """The commands that need the schema say what to run, exit 2 (it was PostgreSQL's
    error, exit 3, kept for an unreachable database); `longhaul migrate` still creates
    the missing database."""
    name = missing_database.rsplit("/", 1)[1]
    latest = migrations()[-1].version
    for url, says in (
        (missing_database, f'database "{name}" does not exist'),
        (
            bare_database,
            f"the database is not migrated (schema version 0, this code needs {latest})",
        ),
    ):
        env = {**ROOT_ENV, **deployment.env(database_url=url)}
        for command in (("keys", "list"), ("dlq", "list"), ("keys", "create", "--tenant", "t")):
            returncode, _, err = await run_cli(env, *command)
            assert (returncode, err) == (2, f"longhaul: {says}: run `longhaul migrate` first\n")
    env = {**ROOT_ENV, **deployment.env(database_url=missing_database)}
    returncode, out, err = await run_cli(env, "migrate")
    assert returncode == 0 and out.startswith("migrations applied: "), err
    returncode, _, err = await run_cli(env, "keys", "list")
    assert returncode == 0, err


@pytest.mark.parametrize(
    ("dsn", "code", "says"),
    [
        # asyncpg refuses it before connecting (its configuration errors are
        # InterfaceErrors too, as is a lost connection: the order of handling matters)
        ("postgresql://127.0.0.1/x?sslmode=bogus", 2, "longhaul: `sslmode` parameter"),
        ("postgresql://127.0.0.1:{port}/x", 3, "longhaul: PostgreSQL at postgresql://"),
        # The password is not shown.
        (
            "postgresql://u:sekret@127.0.0.1:{port}/x",
            3,
            "longhaul: PostgreSQL at postgresql://u:***@",
        ),
    ],
)
async def test_the_cli_tells_a_bad_database_url_from_an_unreachable_database(
    deployment: Deployment, dsn: str, code: int, says: str
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        env = deployment.env(database_url=dsn.format(port=closed.getsockname()[1]))
        returncode, _, err = await run_cli({**ROOT_ENV, **env}, "keys", "list")
    lines = err.splitlines()
    assert (returncode, len(lines)) == (code, 1), lines
    assert lines[0].startswith(says), lines
    assert "sekret" not in err


async def test_migrate_waits_for_postgresql_then_says_it_is_unreachable(
    deployment: Deployment,
) -> None:
    """Run first in a deployment, while PostgreSQL may still be starting: it retries for
    the start timeout, then one line and exit code 3 (it was a traceback)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = deployment.env(
            database_url=f"postgresql://127.0.0.1:{closed.getsockname()[1]}/x",
            start_timeout_s="1",
        )
        returncode, _, err = await run_cli({**ROOT_ENV, **env}, "migrate")
    *waits, last = err.splitlines()
    assert returncode == 3 and "Traceback" not in err, err
    assert last.startswith("longhaul: PostgreSQL unreachable for 1s (LONGHAUL_START_TIMEOUT_S)")
    # Each wait says for what, and why (they were bare "waiting for dependency" lines).
    assert waits and all(w.startswith("waiting for PostgreSQL: ") for w in waits), waits


async def test_a_worker_whose_start_fails_drains_what_it_started(isolated: Isolated) -> None:
    """The dead-letter consumer's start does not answer (a failpoint hangs it) after the
    task lanes and the background loops started, and a task the relay published is
    running: the worker stops taking work, hands the task back (no grace) and stops its
    loops before the connections close, then exits with one line, code 3. Before, the
    connections closed under the running handler, and the task was left running."""
    task_id = uuid7()
    await ApiRepository(isolated.db, timeout=10).insert(
        isolated.tenant.id,
        [NewTask(id=task_id, request=TaskRequest(type="demo.sleep", args={"seconds": 600}))],
    )
    env = isolated.deployment.env(
        worker_metrics_port="0",
        io_timeout_s="5",
        shutdown_grace_s="0",
        failpoints="worker.before_dead_letter_consumer=hang",
    )
    proc = ServiceProcess("services.worker", env)
    code, lines = await asyncio.to_thread(_exit, proc)
    says = "worker: RabbitMQ: consumers not started within 5s (LONGHAUL_IO_TIMEOUT_S)"
    assert (code, lines) == (3, [says])
    row = await isolated.db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    assert (row["state"], row["attempts"], row["message"]) == (
        "queued",
        1,
        "attempt interrupted (shutdown)",
    )
    assert _errors_logged(proc) == []


async def test_every_service_names_a_setting_no_one_reads_at_start(isolated: Isolated) -> None:
    """A typo'd name would leave its default in place without a word: each service
    logs it, with the name it is close to. A name another service reads is no typo."""
    system = System(isolated.deployment.env())
    typo = {"worker_concurency": "64", "entirely_new_setting": "1"}
    try:
        procs = [
            await system.start_api(**typo),
            await system.start_worker(**typo),
            await system.start_gateway(**typo),
        ]
        for proc in procs:
            logged = [
                orjson.loads(line) for line in proc.output().splitlines() if line.startswith("{")
            ]
            [warning] = [r["msg"] for r in logged if "no setting reads" in r["msg"]]
            assert "LONGHAUL_WORKER_CONCURENCY (LONGHAUL_WORKER_CONCURRENCY?)" in warning
            assert "LONGHAUL_ENTIRELY_NEW_SETTING" in warning
            # Set for every service by the test's deployment, read by some: not named.
            assert "LONGHAUL_API_PORT" not in warning and "NAMESPACE" not in warning
    finally:
        system.stop()
