"""Celery running the benchmark's no-op, configured from env vars (see peer_common).

safe: RabbitMQ with publisher confirms, task_acks_late, Redis result backend (the
client waits for every result). unsafe: no confirms, acks on receipt, no results,
a large prefetch: Celery's fastest configuration. Queue, exchanges and result keys are
named after the run, so nothing is shared with anything else on the broker."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from bench.peer_common import AMQP_URL, COUNTER, PREFIX, QUEUE, REDIS_URL, SAFE

app = Celery("lhbench", broker=AMQP_URL, backend=REDIS_URL if SAFE else None)
app.conf.update(
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_queues=[Queue(QUEUE, Exchange(QUEUE, type="direct", durable=True), routing_key=QUEUE)],
    task_acks_late=SAFE,
    task_ignore_result=not SAFE,
    task_serializer="json",
    result_serializer="json",
    broker_transport_options={"confirm_publish": SAFE},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    result_expires=600,
    worker_prefetch_multiplier=16 if SAFE else 128,
    # The client holds one producer (connection) per thread, 64 of them (the default
    # pool of 10 would make the others wait for one).
    broker_pool_limit=128,
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    control_exchange=f"{QUEUE}.pidbox",
    event_exchange=f"{QUEUE}.ev",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop() -> dict[str, bool]:
    if not SAFE:
        COUNTER.hit()
    return {"ok": True}
