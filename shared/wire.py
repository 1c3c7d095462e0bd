"""Names on the wire: exchanges, queues, Redis keys and channels, all under one namespace."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

# A task of this priority or above (0..9) goes to the high lane, the others to the normal
# lane. Workers start a waiting high-lane delivery before any waiting normal one; within
# a lane the order stays FIFO (RabbitMQ 3.10's quorum queues have no message priorities).
HIGH_PRIORITY = 5


def is_high(priority: int) -> bool:
    """Whether a task of ``priority`` travels in the high lane."""
    return priority >= HIGH_PRIORITY


@dataclass(frozen=True)
class Wire:
    """Every name a service uses to meet another, derived from the deployment's namespace."""

    namespace: str

    # RabbitMQ
    @property
    def tasks_exchange(self) -> str:
        return f"{self.namespace}.tasks"

    @property
    def tasks_queue(self) -> str:
        return f"{self.namespace}.tasks"

    @property
    def tasks_routing_key(self) -> str:
        return "task"

    @property
    def high_tasks_queue(self) -> str:
        """The high lane: tasks of priority HIGH_PRIORITY and above."""
        return f"{self.tasks_queue}.high"

    @property
    def high_tasks_routing_key(self) -> str:
        return "task.high"

    @property
    def task_queues(self) -> tuple[str, str]:
        """Both lanes' queues, the normal one first."""
        return (self.tasks_queue, self.high_tasks_queue)

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def queues(self) -> tuple[str, ...]:
        """Every queue of the namespace (amqp.declare declares them all)."""
        return (*self.task_queues, self.dead_letter_queue)

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every exchange of the namespace (amqp.declare declares them all)."""
        return (self.tasks_exchange, self.dead_letter_exchange)

    # Redis
    @property
    def redis_prefix(self) -> str:
        return f"{self.namespace}:"

    def event_stream(self, task_id: UUID | str) -> str:
        """Per-task stream of progress events; entry id ``<seq>-0``."""
        return f"{self.namespace}:stream:{task_id}"

    def event_channel(self, task_id: UUID | str) -> str:
        """Per-task pub/sub channel carrying the same events live."""
        return f"{self.namespace}:events:{task_id}"

    @property
    def event_channel_pattern(self) -> str:
        return f"{self.namespace}:events:*"

    @property
    def control_channel(self) -> str:
        """Commands to workers (cancel a running task)."""
        return f"{self.namespace}:control"

    def ws_token(self, token_hash: str) -> str:
        return f"{self.namespace}:wstoken:{token_hash}"

    def tenant_connections(self, tenant_id: UUID | str) -> str:
        """The tenant's open gateway connections (services/ws_gateway/leases.py)."""
        return f"{self.namespace}:conns:{tenant_id}"

    def rate_bucket(self, tenant_id: UUID | str) -> str:
        return f"{self.namespace}:rate:{tenant_id}"
