"""A namespace's deletion, without a network: which names it covers, what it says, and
when it refuses."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aio_pika.abc import AbstractChannel

from shared import amqp
from shared.decommission import (
    COUNT_CAP,
    Database,
    Deleted,
    Queue,
    Survey,
    busy,
    describe,
    key_pattern,
    refusal,
    summary,
)
from shared.settings import CommonSettings
from shared.wire import Wire


class _Declared:
    """An exchange or queue as a recording channel hands it back."""

    async def bind(self, *args: Any, **kwargs: Any) -> None:
        pass


class _RecordingChannel:
    """Stands in for a channel: records what amqp.declare declares."""

    def __init__(self) -> None:
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    async def declare_queue(self, name: str, **kwargs: Any) -> _Declared:
        self.queues.append(name)
        return _Declared()

    async def declare_exchange(self, name: str, *args: Any, **kwargs: Any) -> _Declared:
        self.exchanges.append(name)
        return _Declared()


async def test_the_wire_names_every_queue_and_exchange_the_services_declare() -> None:
    """What a deletion removes is what amqp.declare creates: a queue added to the one and
    not the other would outlive its namespace."""
    wire = Wire("ns")
    channel = _RecordingChannel()
    await amqp.declare(cast(AbstractChannel, channel), CommonSettings(namespace="ns"), wire)
    assert sorted(channel.queues) == sorted(wire.queues)
    assert sorted(channel.exchanges) == sorted(wire.exchanges)


def test_every_redis_key_of_a_namespace_is_under_its_prefix() -> None:
    wire = Wire("ns")
    keys = [
        wire.event_stream("t"),
        wire.ws_token("h"),
        wire.tenant_connections("t"),
        wire.rate_bucket("t"),
    ]
    assert all(key.startswith(wire.redis_prefix) for key in keys), keys
    # A namespace that extends another's name is not under its prefix.
    assert not Wire("ns_b").event_stream("t").startswith(wire.redis_prefix)


@pytest.mark.parametrize(
    ("prefix", "pattern"),
    [("ns:", "ns:*"), ("a*b?[c]\\:", "a\\*b\\?\\[c\\]\\\\:*")],
)
def test_the_key_pattern_matches_the_prefix_literally(prefix: str, pattern: str) -> None:
    assert key_pattern(prefix) == pattern


def _survey(**changes: Any) -> Survey:
    base: dict[str, Any] = {
        "namespace": "ns",
        "queues": {"ns.tasks": None, "ns.tasks.high": None, "ns.dead": None},
        "exchanges": {"ns.tasks": False, "ns.dlx": False},
        "keys": 0,
        "database_name": "ns",
        "database": None,
    }
    return Survey(**{**base, **changes})


def test_the_listing_names_each_queue_with_its_messages_and_the_database_left_alone() -> None:
    survey = _survey(
        queues={
            "ns.tasks": Queue("ns.tasks", 3, 0),
            "ns.tasks.high": Queue("ns.tasks.high", 1, 2),
            "ns.dead": None,
        },
        exchanges={"ns.tasks": True, "ns.dlx": False},
        keys=12,
    )
    assert describe(survey) == [
        "queue ns.tasks: 3 messages ready, 0 consumers",
        "queue ns.tasks.high: 1 message ready, 2 consumers",
        "queue ns.dead: absent",
        "exchange ns.tasks",
        "exchange ns.dlx: absent",
        "redis: 12 keys under ns:",
        "database ns: left alone (--drop-database drops it)",
    ]
    assert refusal(survey, force=False) is not None


@pytest.mark.parametrize(
    ("database", "line"),
    [
        (Database("ns", exists=False), "database ns: absent"),
        (
            Database("ns", True, 1, True),
            "database ns: to be dropped (1 other session, 0 unfinished tasks,"
            " 0 unpublished outbox rows)",
        ),
        (
            Database("ns", True, 0, True, tasks=1, outbox=COUNT_CAP),
            "database ns: to be dropped (0 other sessions, 1 unfinished task,"
            f" at least {COUNT_CAP} unpublished outbox rows)",
        ),
    ],
)
def test_the_listing_says_what_becomes_of_the_database(database: Database, line: str) -> None:
    assert describe(_survey(database=database))[-1] == line


def test_an_idle_namespace_is_not_refused() -> None:
    idle = {"ns.tasks": Queue("ns.tasks", 0, 0), "ns.tasks.high": None, "ns.dead": None}
    assert refusal(_survey(queues=idle), force=False) is None
    assert refusal(_survey(database=Database("ns", True, 0, True)), force=False) is None


def test_what_is_in_use_is_refused_in_one_line_naming_it_unless_forced() -> None:
    survey = _survey(
        queues={
            "ns.tasks": Queue("ns.tasks", 0, 1),
            "ns.tasks.high": Queue("ns.tasks.high", 0, 0),
            "ns.dead": Queue("ns.dead", 2, 0),
        },
        database=Database("ns", True, 3, True),
    )
    assert refusal(survey, force=False) == (
        "namespace ns is in use: queue ns.tasks has 1 consumer; queue ns.dead has 2"
        " messages ready; database ns has 3 other sessions. Stop its processes and let its"
        " queues drain, or give --force to delete it anyway"
    )
    assert refusal(survey, force=True) is None


@pytest.mark.parametrize(
    ("database", "says"),
    [
        (Database("postgres", True, 0, True), "database postgres is PostgreSQL's own"),
        (Database("shop", True, 0, False), "database shop holds no Longhaul schema"),
    ],
)
def test_a_database_that_is_not_longhauls_is_never_dropped(database: Database, says: str) -> None:
    for force in (False, True):
        why = refusal(_survey(database=database), force=force)
        assert why is not None and why.startswith(says), why


def test_the_summary_counts_what_went_and_names_the_dropped_database() -> None:
    assert summary("ns", Deleted(1, 0, 2, 1, None)) == [
        "deleted 1 queue (0 messages), 2 exchanges and 1 Redis key of namespace ns"
    ]
    assert summary("ns", Deleted(3, 5, 2, 0, "ns"))[1:] == ["dropped database ns"]


def test_work_left_in_the_database_to_drop_is_refused_in_one_line_unless_forced() -> None:
    """With every process stopped, tasks not finished and outbox rows not yet published
    would go with the database: as much in use as a queue's messages."""
    for tasks, outbox, held in [
        (2, 0, "2 unfinished tasks"),
        (0, 1, "1 unpublished outbox row"),
        (COUNT_CAP, 3, f"at least {COUNT_CAP} unfinished tasks and 3 unpublished outbox rows"),
    ]:
        survey = _survey(database=Database("ns", True, 0, True, tasks=tasks, outbox=outbox))
        assert refusal(survey, force=False) == (
            f"namespace ns is in use: database ns holds {held}. Stop its processes and let"
            " its queues drain, or give --force to delete it anyway"
        )
        assert refusal(survey, force=True) is None


def test_a_queue_is_busy_with_a_consumer_or_ready_messages() -> None:
    assert busy(Queue("q", 0, 0)) is None
    assert busy(Queue("q", 1, 0)) == "queue q has 1 message ready"
    assert busy(Queue("q", 2, 1)) == "queue q has 1 consumer and 2 messages ready"
