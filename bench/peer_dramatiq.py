"""Dramatiq running the benchmark's no-op, configured from env vars (see peer_common).

safe: RabbitMQ with publisher confirms (``confirm_delivery``); Dramatiq always acks
after the actor returns. unsafe: no confirms. Completion is counted with the shared
counter (no result backend). Dramatiq declares classic durable queues ``Q``, ``Q.DQ``
and ``Q.XQ`` on the default exchange."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import default_middleware

from bench.peer_common import AMQP_URL, COUNTER, QUEUE, SAFE

broker = RabbitmqBroker(
    url=AMQP_URL,
    confirm_delivery=SAFE,
    middleware=[m() for m in default_middleware],
)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop() -> None:
    COUNTER.hit()
