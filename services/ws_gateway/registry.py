"""Who is connected and who listens to which task: the fan-out bookkeeping and the caps.
Pure: no I/O, so the hub's decisions are tested without Redis or sockets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from typing import Generic, TypeVar
from uuid import UUID

C = TypeVar("C", bound=Hashable)


class Refused(Exception):
    """A connection or subscription over a cap; ``code`` goes into the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Registry(Generic[C]):
    def __init__(
        self, *, max_connections: int, max_per_tenant: int, max_subscriptions: int
    ) -> None:
        self._max_connections = max_connections
        self._max_per_tenant = max_per_tenant
        self._max_subscriptions = max_subscriptions
        self._tenant_of: dict[C, UUID] = {}
        self._per_tenant: dict[UUID, int] = defaultdict(int)
        self._tasks_of: dict[C, set[UUID]] = {}
        self._listeners: dict[UUID, set[C]] = {}

    # ---- connections

    def check_room(self, tenant_id: UUID | None = None) -> None:
        """Raise Refused when one more connection (of this tenant) is over a cap."""
        if len(self._tenant_of) >= self._max_connections:
            raise Refused("too_many_connections", "the gateway is at its connection limit")
        # get(), not []: a check must not leave a zero entry for a handshake that fails.
        if tenant_id is not None and self._per_tenant.get(tenant_id, 0) >= self._max_per_tenant:
            raise Refused("too_many_connections", "this tenant is at its connection limit")

    def open(self, conn: C, tenant_id: UUID) -> None:
        self.check_room(tenant_id)
        self._tenant_of[conn] = tenant_id
        self._per_tenant[tenant_id] += 1
        self._tasks_of[conn] = set()

    def close(self, conn: C) -> None:
        """Forget a connection and all its subscriptions; idempotent."""
        tenant_id = self._tenant_of.pop(conn, None)
        if tenant_id is None:
            return
        self._per_tenant[tenant_id] -= 1
        if self._per_tenant[tenant_id] <= 0:
            del self._per_tenant[tenant_id]
        for task_id in self._tasks_of.pop(conn, set()):
            self._drop_listener(task_id, conn)

    # ---- subscriptions

    def subscribe(self, conn: C, task_id: UUID) -> bool:
        """Add a subscription; False when it already existed. Raise Refused over the cap."""
        tasks = self._tasks_of[conn]
        if task_id in tasks:
            return False
        if len(tasks) >= self._max_subscriptions:
            raise Refused(
                "too_many_subscriptions",
                f"at most {self._max_subscriptions} subscriptions per connection",
            )
        tasks.add(task_id)
        self._listeners.setdefault(task_id, set()).add(conn)
        return True

    def unsubscribe(self, conn: C, task_id: UUID) -> bool:
        tasks = self._tasks_of.get(conn)
        if tasks is None or task_id not in tasks:
            return False
        tasks.discard(task_id)
        self._drop_listener(task_id, conn)
        return True

    def listeners(self, task_id: UUID) -> tuple[C, ...]:
        # A copy: a listener may be closed while the caller iterates.
        return tuple(self._listeners.get(task_id, ()))

    def subscribed_tasks(self) -> list[UUID]:
        """Every task someone here listens to."""
        return list(self._listeners)

    def connections(self) -> tuple[C, ...]:
        return tuple(self._tenant_of)

    def tenant_of(self, conn: C) -> UUID | None:
        return self._tenant_of.get(conn)

    @property
    def connection_count(self) -> int:
        return len(self._tenant_of)

    @property
    def subscription_count(self) -> int:
        return sum(len(t) for t in self._tasks_of.values())

    def _drop_listener(self, task_id: UUID, conn: C) -> None:
        listeners = self._listeners.get(task_id)
        if listeners is not None:
            listeners.discard(conn)
            if not listeners:
                del self._listeners[task_id]
