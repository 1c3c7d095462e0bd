"""Faults of our own processes: kill -9 and SIGTERM of workers, crashes at each step of
the worker and the relay (failpoints), the API killed between commit and publish, and a
message published twice. The shared RabbitMQ, Redis and PostgreSQL are never touched."""

from __future__ import annotations

import asyncio
import contextlib
import time
from uuid import UUID

import aio_pika

from shared.schemas import TaskMessage, encode_task_message
from tests.conftest import Deployment, Isolated, Tenant
from tests.faults.conftest import MakeRun
from tests.faults.harness import TASK_TYPE, FaultRun, summarize_recoveries, worker_id_of
from tests.faults.ledger_tasks import LEDGER_DDL
from tests.support import ServiceProcess, eventually

N = 60


async def test_worker_kill9_repeatedly(make_run: MakeRun) -> None:
    """Two workers; one of them is killed -9 about every second and restarted; every
    accepted task still succeeds, and no attempt executes twice."""
    run = make_run()
    await run.start_api()
    await run.start_worker()
    await run.start_worker()
    ids = await run.submit(80, sleep_s=1.0)
    kills: list[tuple[float, dict[UUID, int]]] = []
    for round_ in range(6):
        await asyncio.sleep(0.8)
        victim = run.workers()[round_ % 2]
        victim.kill9()
        killed_at = await run.now()
        kills.append((killed_at, await run.running_on(worker_id_of(victim))))
        await run.start_worker()
    settle_s = await run.settle(ids)
    under_load = await _recoveries(run, kills)

    # The same measure on an idle system: a backlog no longer hides how fast the lease
    # runs out, the reaper requeues and the next attempt is published and claimed.
    probe = await run.submit(4, sleep_s=4.0)
    victim = await eventually(
        lambda: _holder(run, probe), within=20, what="a worker running the probe tasks"
    )
    victim.kill9()
    idle_kill = [(await run.now(), await run.running_on(worker_id_of(victim)))]
    await run.start_worker()
    await run.settle(probe)
    idle = summarize_recoveries(await _recoveries(run, idle_kill))
    await run.judge(
        "worker kill -9 x7",
        ids + probe,
        recover_s=idle.get("max_s"),
        notes="recover_s: kill -9 to the killed attempts executing again (idle system)",
        kill9_recovery_idle=idle,
        kill9_recovery_under_load=summarize_recoveries(under_load),
        settle_s=round(settle_s, 2),
        interrupted_attempts=sum(len(r) for _, r in kills + idle_kill),
    )
    assert sum(len(r) for _, r in kills) > 0, "no kill hit a running attempt"


async def _holder(run: FaultRun, ids: list[UUID]) -> ServiceProcess | None:
    """The live worker currently running some of ``ids``."""
    for proc in run.workers():
        running = await run.running_on(worker_id_of(proc))
        if set(running) & set(ids):
            return proc
    return None


async def _recoveries(run: FaultRun, kills: list[tuple[float, dict[UUID, int]]]) -> list[float]:
    """Seconds from each kill to each of its interrupted attempts executing again."""
    out: list[float] = []
    for killed_at, running in kills:
        for task_id, attempt in running.items():
            rerun = await run.rerun_at(task_id, attempt)
            if rerun is not None:
                out.append(rerun - killed_at)
    return out


async def test_worker_sigterm_mid_run(make_run: MakeRun) -> None:
    """A worker told to stop while running attempts drains within its (short) grace
    period, hands the rest back as next attempts, and exits 0; nothing is lost."""
    run = make_run()
    await run.start_api()
    await run.start_worker()
    await run.start_worker()
    ids = await run.submit(24, sleep_s=2.5)
    victim = await eventually(lambda: _holder(run, ids), within=20, what="a busy worker")
    stopped_at = time.monotonic()
    code = await asyncio.to_thread(victim.terminate)
    stop_s = time.monotonic() - stopped_at
    await run.start_worker()
    settle_s = await run.settle(ids)
    await run.judge(
        "worker SIGTERM",
        ids,
        recover_s=round(stop_s, 2),
        notes="recover_s: SIGTERM to the worker's exit (grace 1 s)",
        exit_code=code,
        settle_s=round(settle_s, 2),
    )
    assert code == 0, victim.output()[-2000:]


async def test_a_worker_whose_loop_hangs_exits_for_its_supervisor(make_run: MakeRun) -> None:
    """An essential loop that hangs (the lease renewal, by a failpoint) is caught by the
    watchdog at its bound, 15 s here: the worker drains and exits 4 with one line naming
    the loop, for a supervisor that sees only exits (compose's restart policy) to start
    another. Tasks come in until it exits, so some are running then: unrenewed, their
    attempts lapse or are handed back, and run again; nothing is lost."""
    run = make_run()
    await run.start_api()
    hung = await run.start_worker(failpoints="worker.heartbeat=hang", io_timeout_s="1")
    started = time.monotonic()
    ids: list[UUID] = []
    while hung.alive() and time.monotonic() - started < 60:
        ids += await run.submit(1, sleep_s=1.5)
        await asyncio.sleep(0.5)
    code = await asyncio.to_thread(hung.proc.wait, 10)
    exit_s = time.monotonic() - started
    assert code == 4, hung.output()[-3000:]
    assert exit_s > 10, "stopped before the loop's bound (15 s) ran out"
    assert (
        "worker: stopped after a failure: lease-heartbeat hung: no turn within its bound"
        in hung.output()
    ), hung.output()[-3000:]
    await run.start_worker()
    settle_s = await run.settle(ids)
    await run.judge(
        "worker loop hung",
        ids,
        recover_s=round(exit_s, 2),
        notes="recover_s: start to the hung worker's exit (its bound: 15 s)",
        exit_code=code,
        settle_s=round(settle_s, 2),
    )


async def _crash_loop(run: FaultRun, failpoint: str, crashes: int) -> tuple[list[int], list[UUID]]:
    """Run a worker with ``failpoint=crash`` beside a healthy one; each time it dies,
    start it again, ``crashes`` times. Each start is followed by its share of the N
    tasks: submitted all at first, they could all be done by the healthy worker before
    a restarted one (slow to start on a busy machine) asked for any. Return the pids
    that crashed and the ids of the tasks submitted."""
    crashed: list[int] = []
    ids: list[UUID] = []
    for i in range(crashes):
        # It may crash before it answers /readyz: still a crash.
        with contextlib.suppress(AssertionError):
            await run.start_worker(failpoints=f"{failpoint}=crash")
        proc = run.system.procs[-1]
        ids += await run.submit(N // crashes + (N % crashes if i == 0 else 0), sleep_s=0.3)
        await eventually(
            lambda proc=proc: asyncio.sleep(0, result=not proc.alive()),
            within=30,
            what=f"the worker to hit {failpoint}",
        )
        assert proc.proc.returncode == 137, proc.output()[-2000:]
        assert f"failpoint {failpoint}: crashing" in proc.output()
        crashed.append(proc.pid)
    return crashed, ids


async def test_worker_crash_after_effect_before_commit(make_run: MakeRun) -> None:
    """``worker.before_commit``: the effect happened, the outcome was not committed. The
    lease runs out and the task runs again as the *next* attempt: a new execution, not a
    duplicate one; the crashed attempt's effect stays in the ledger under its number."""
    run = make_run()
    await run.start_api()
    await run.start_worker()
    crashed, ids = await _crash_loop(run, "worker.before_commit", 3)
    settle_s = await run.settle(ids)
    result = await run.judge(
        "failpoint worker.before_commit",
        ids,
        recover_s=None,
        crashes=len(crashed),
        settle_s=round(settle_s, 2),
    )
    # Each crash interrupted at least the attempt that reached the failpoint.
    assert result.redeliveries >= len(crashed)


async def test_worker_crash_after_commit_before_ack(make_run: MakeRun) -> None:
    """``worker.after_commit``: committed, never acked. The broker redelivers; the
    redelivery finds the task terminal and is acked without running it again."""
    run = make_run()
    await run.start_api()
    await run.start_worker()
    crashed, ids = await _crash_loop(run, "worker.after_commit", 3)
    settle_s = await run.settle(ids)
    committed_by_crashed = await run.pool.fetchval(
        "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND state = 'succeeded' "
        "AND (result->>'pid')::int = ANY($2::int[])",
        ids,
        crashed,
    )
    await run.judge(
        "failpoint worker.after_commit",
        ids,
        recover_s=None,
        crashes=len(crashed),
        committed_then_crashed=int(committed_by_crashed),
        settle_s=round(settle_s, 2),
    )
    assert committed_by_crashed >= len(crashed), "no success was committed by a crashing worker"


async def test_relay_crash_after_confirm(make_run: MakeRun) -> None:
    """``relay.after_confirm``: the broker confirmed, the outbox rows were not deleted. The
    next relay publishes them again; every copy after the first is absorbed."""
    run = make_run()
    # Only the APIs publish here, so the crashing relay is the one that sees the rows.
    await run.start_worker(relay_enabled="false")
    api = await run.start_api(relay_enabled="false")
    ids = await run.submit(N, sleep_s=0.2)
    await asyncio.to_thread(api.terminate)
    assert await run.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])", ids
    ) == len(ids)
    with contextlib.suppress(AssertionError):  # it may crash before answering /readyz
        await run.start_api(failpoints="relay.after_confirm=crash")
    crashing = run.system.procs[-1]
    await eventually(
        lambda: asyncio.sleep(0, result=not crashing.alive()), within=30, what="the relay crash"
    )
    assert "failpoint relay.after_confirm: crashing" in crashing.output()
    republished = await run.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])", ids
    )
    await run.start_api()
    settle_s = await run.settle(ids)
    result = await run.judge(
        "failpoint relay.after_confirm",
        ids,
        recover_s=None,
        published_twice=int(republished),
        settle_s=round(settle_s, 2),
    )
    assert republished > 0, "the crashed relay deleted its rows: nothing was republished"
    assert result.executions == len(ids), "a republished message ran a task again"


async def test_api_stops_when_its_relay_fails(isolated: Isolated, make_run: MakeRun) -> None:
    """A bug in the relay (an exception nothing expects) must not leave an API that
    accepts tasks nobody publishes: the API drains, exits 4 with one line naming the
    relay, and the next API's relay publishes what it had accepted. A namespace and
    database of its own: rows other tests left in the shared outbox (a stopped worker's
    hand-back) made the relay fail at its first flush, before the API was ready.
    ``isolated`` first: fixtures end in reverse, so the run's processes stop before its
    namespace is deleted (a worker still running declared its queue again)."""
    await isolated.db.execute(LEDGER_DDL)
    run = make_run(
        env=isolated.deployment.env(),
        pool=isolated.db,
        api_key=isolated.tenant.key,
        namespace=isolated.deployment.namespace,
    )
    await run.start_worker(relay_enabled="false")
    # Tasks accepted once its relay is gone are claimed for no one: they wait for the
    # claim to lapse (as short as the I/O timeout allows, to keep the test short).
    api = await run.start_api(
        failpoints="relay.before_publish=raise", io_timeout_s="2", handoff_claim_s="6"
    )
    ids = await run.submit(N, sleep_s=0.1)
    code = await asyncio.to_thread(api.proc.wait, 30)
    assert code == 4, api.output()[-3000:]
    assert "api: stopped after a failure: outbox-relay failed: InjectedFault(" in api.output()
    unpublished = await run.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])", ids
    )
    await run.start_api()
    settle_s = await run.settle(ids)
    result = await run.judge(
        "relay raised (a bug)",
        ids,
        recover_s=None,
        unpublished=int(unpublished),
        settle_s=round(settle_s, 2),
    )
    assert unpublished > 0, "the failing relay published something"
    assert result.executions == len(ids)


async def test_api_kill9_between_commit_and_publish(make_run: MakeRun) -> None:
    """The API answers 202 (task and outbox row committed) and dies before publishing;
    a new API's relay publishes the rows and every task completes. Their claims hold for
    ten minutes: the relay finds that the process that claimed them died, and does not
    wait for the claims to lapse."""
    run = make_run()
    await run.start_worker(relay_enabled="false")
    api = await run.start_api(failpoints="relay.before_publish=hang", handoff_claim_s="600")
    ids = await run.submit(N, sleep_s=0.1)
    unpublished = await run.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])", ids
    )
    executed_before = await run.executions(ids)
    api.kill9()
    killed = time.monotonic()
    await run.start_api()
    await run.settle(ids)
    await run.judge(
        "API kill -9 before publish",
        ids,
        recover_s=round(time.monotonic() - killed, 2),
        notes="recover_s: kill -9 to every task terminal (includes the new API's start)",
        unpublished_at_kill=int(unpublished),
    )
    assert unpublished == len(ids) and executed_before == 0, "the failpoint did not hold"


async def test_duplicate_publish(make_run: MakeRun, deployment: Deployment, tenant: Tenant) -> None:
    """Copies of every task message, published by hand while the originals run and
    again after they finished, run nothing a second time."""
    run = make_run()
    await run.start_api()
    await run.start_worker()
    ids = await run.submit(N, sleep_s=0.3)
    wire = deployment.wire
    bodies = [
        encode_task_message(TaskMessage(task_id=i, tenant_id=tenant.id, type=TASK_TYPE, attempt=1))
        for i in ids
    ]
    connection = await aio_pika.connect(deployment.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(wire.tasks_exchange)

        async def publish_copies() -> None:
            for body in bodies:
                await exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    wire.tasks_routing_key,
                    mandatory=True,
                )

        await publish_copies()  # racing the originals
        await run.settle(ids)
        await publish_copies()  # after the tasks are terminal
        metrics = f"http://127.0.0.1:{run.system.metrics_port}/metrics"
        await eventually(
            lambda: _deliveries_at_least(run, metrics, 3 * len(ids)),
            within=30,
            what="every copy delivered",
        )
        await eventually(
            lambda: _drained(channel, wire.tasks_queue), within=30, what="the queue to drain"
        )
    finally:
        await connection.close()
    await asyncio.sleep(0.5)  # the last deliveries' claims are fenced SQL round trips
    result = await run.judge(
        "duplicate publish x2", ids, recover_s=None, copies_published=2 * len(ids)
    )
    assert result.executions == len(ids) and result.redeliveries == 0


async def _deliveries_at_least(run: FaultRun, url: str, n: int) -> bool:
    async with run.http.get(url) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("longhaul_worker_deliveries_total "):
            return float(line.split()[1]) >= n
    return False


async def _drained(channel: aio_pika.abc.AbstractChannel, name: str) -> bool:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count == 0
