"""Tasks that run longer than RabbitMQ's ``consumer_timeout`` (GitHub issue #4).

The broker closes a channel that holds a delivery unacked for longer than
``consumer_timeout`` (30 min by default) with ``PRECONDITION_FAILED - delivery
acknowledgement on channel N timed out``, and requeues what that channel held. Longhaul
keeps ack-after-commit and lets that happen: the lease in PostgreSQL, not the delivery,
owns a running attempt, so the redelivered copy finds the attempt running and is acked and
skipped; the original handler goes on and commits through its fenced UPDATE; its own late
ack fails harmlessly (stale channel); aio-pika's robust channel reopens and restores the
consumer (and the consumer watchdog consumes again if the broker dropped it).

Tested for real on a private RabbitMQ 3.10 node with ``consumer_timeout`` = 3 s. In 3.10
the broker checks the timeout on the channel's tick, ``channel_tick_interval`` (an app
env of ``rabbit``, 60 s by default, not in the rabbitmq.conf schema), so advanced.config
sets it to 1 s as well; RabbitMQ's own test suites set it the same way."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Deployment
from tests.faults.conftest import MakeRun
from tests.faults.harness import FaultRun
from tests.faults.private import PrivateRabbit
from tests.support import ServiceProcess, eventually

CONSUMER_TIMEOUT_MS = 3000
ADVANCED_CONFIG = (
    f"[{{rabbit, [{{consumer_timeout, {CONSUMER_TIMEOUT_MS}}}, "
    "{channel_tick_interval, 1000}]}].\n"
)
LONG = 4  # tasks that each run well past the timeout
LONG_S = 12.0
SHORT = 6
SHORT_S = 0.2

# The broker's own log line when it closes a channel for the timeout (3.10), e.g.
#   ... [error] <0.731.0> operation none caused a channel exception precondition_failed:
#   delivery acknowledgement on channel 1 timed out. Timeout value used: 3000 ms. ...
# The line may be logged twice for one channel: closures are counted by channel process.
BROKER_TIMEOUT = re.compile(
    r"(<[\d.]+>) operation none caused a channel exception precondition_failed: "
    r"delivery acknowledgement on channel \d+ timed out"
)
STALE_ACK = "could not settle a delivery"
UNEXPECTED = "processing failed unexpectedly"


@pytest.fixture
def short_timeout_rabbit() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(advanced_config=ADVANCED_CONFIG)
    try:
        node.start()
        yield node
    finally:
        # Keep the node's own log (its channel errors) as an artifact before its
        # directory is removed.
        with contextlib.suppress(OSError):
            for path in sorted(Path(node.dir, "log").glob("*.log")):
                shutil.copy(path, node.log_path.with_suffix(f".{path.name}"))
        node.close()


def _metrics_port(proc: ServiceProcess) -> int:
    """The metrics port a worker was started with (System picks it and keeps no note)."""
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"LONGHAUL_WORKER_METRICS_PORT="):
            return int(entry.split(b"=", 1)[1])
    raise AssertionError(f"worker {proc.pid} has no LONGHAUL_WORKER_METRICS_PORT")


async def _deliveries(run: FaultRun) -> int:
    """Task deliveries the workers received, redeliveries included (their metric)."""
    total = 0.0
    for proc in run.workers():
        url = f"http://127.0.0.1:{_metrics_port(proc)}/metrics"
        async with run.http.get(url) as response:
            text = await response.text()
        found = re.search(r"^longhaul_worker_deliveries_total (\S+)$", text, re.MULTILINE)
        assert found, f"no deliveries metric at {url}"
        total += float(found.group(1))
    return int(total)


def _queue_depth(rabbit: PrivateRabbit, queue: str) -> int | None:
    """Ready + unacked messages in ``queue`` (None if the broker did not answer)."""
    out = rabbit.ctl("list_queues", "-q", "--no-table-headers", "name", "messages").stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return None


# Fixtures are torn down in the reverse order: make_run stops the processes first, then
# the namespace's keys are deleted (a worker still running would write events after),
# then the node goes away (a worker told to stop while RabbitMQ is gone waits for it and
# has to be killed).
async def test_tasks_longer_than_consumer_timeout(
    short_timeout_rabbit: PrivateRabbit, fresh_namespace: Deployment, make_run: MakeRun
) -> None:
    """Long tasks outlive their deliveries: every task succeeds on its first attempt with
    one execution, the broker did close channels for the timeout, and the workers still
    consume afterwards."""
    rabbit = short_timeout_rabbit
    namespace = fresh_namespace.namespace
    applied = rabbit.ctl(
        "eval", "{application:get_env(rabbit, consumer_timeout), "
        "application:get_env(rabbit, channel_tick_interval)}."
    ).stdout.strip()  # fmt: skip
    assert applied == f"{{{{ok,{CONSUMER_TIMEOUT_MS}}},{{ok,1000}}}}", (
        f"the private node did not take advanced.config: {applied!r}"
    )
    run = make_run(
        env={"LONGHAUL_AMQP_URL": rabbit.url, "LONGHAUL_NAMESPACE": namespace},
        namespace=namespace,
    )
    queue = run.wire.tasks_queue
    await run.start_api()
    await run.start_worker()
    await run.start_worker()

    long_ids = await run.submit(LONG, sleep_s=LONG_S)
    short_ids = await run.submit(SHORT, sleep_s=SHORT_S)
    ids = long_ids + short_ids
    settle_s = await run.settle(ids, within=90)

    # After the closures the workers still consume: both consumers are back on the
    # queue, and a new task submitted now succeeds.
    async def consumers() -> int:
        return await asyncio.to_thread(rabbit.consumers, queue)

    async def both_consuming() -> int | None:
        n = await consumers()
        return n if n >= 2 else None

    consumers_after = await eventually(
        both_consuming, within=30, interval=0.5, what="both workers consuming again"
    )
    probe_start = time.monotonic()
    probe = await run.submit(2, sleep_s=0.0)
    await run.settle(probe, within=30)
    probe_s = time.monotonic() - probe_start

    # The redelivered copies were delivered and acked, not left on the queue.
    async def queue_empty() -> bool:
        return await asyncio.to_thread(_queue_depth, rabbit, queue) == 0

    await eventually(queue_empty, within=20, interval=0.5, what="the task queue to be empty")
    deliveries = await _deliveries(run)
    broker_log = await asyncio.to_thread(rabbit.broker_log)
    closures = len(set(BROKER_TIMEOUT.findall(broker_log)))
    worker_logs = [p.output() for p in run.workers()]
    stale_acks = sum(out.count(STALE_ACK) for out in worker_logs)
    unexpected = sum(out.count(UNEXPECTED) for out in worker_logs)
    consumers_end = await consumers()

    result = await run.judge(
        "consumer_timeout (3 s)",
        ids + probe,
        recover_s=probe_s,
        notes="recover_s: a new task submitted after the channel closures to its success",
        long_tasks=len(long_ids),
        long_task_s=LONG_S,
        short_tasks=len(short_ids),
        broker_timeout_closures=closures,
        stale_acks_absorbed=stale_acks,
        deliveries=deliveries,
        consumers_after=consumers_after,
        settle_s=round(settle_s, 2),
    )
    assert len(long_ids) == LONG and len(short_ids) == SHORT, run.refused
    # The test proves something only if the broker did enforce the timeout.
    assert closures >= 1, (
        "the broker never closed a channel for consumer_timeout; the test proved nothing:\n"
        + broker_log[-3000:]
    )
    # No re-run: every task finished on attempt 1 with exactly one execution.
    assert result.redeliveries == 0, f"tasks re-ran: {result}"
    assert result.executions == len(ids + probe), f"executions != tasks: {result}"
    # The copies the broker redelivered reached the workers and were skipped (no extra
    # execution or attempt above), and acked (the queue is empty).
    assert deliveries > len(ids + probe), f"no redelivery reached a worker: {deliveries}"
    # The original handler's late ack went to a closed channel and was absorbed.
    assert stale_acks >= 1, "no late ack failed: the channels were not closed under the handlers"
    assert unexpected == 0, "a worker failed to process a delivery"
    assert all(p.alive() for p in run.workers()) and len(run.workers()) == 2
    assert consumers_end > 0
