"""shared.lifecycle: a process stops, drains and exits non-zero when a background loop it
cannot do without ends on its own; a shutdown's own cancel or a drained loop is no
failure. A step of a start that PostgreSQL fails is told in one line."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shared import db
from shared.errors import ConfigError, DependencyError
from shared.lifecycle import (
    EXIT_CONFIG,
    EXIT_FAILED,
    Stop,
    essential,
    run,
    stop_delay,
    wait_for_dependency,
)
from shared.liveness import Liveness, beat


@pytest.fixture(autouse=True)
def _gc_as_it_was() -> Iterator[None]:
    # run() tunes the collector for a service process; the test session keeps its own.
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


async def _boom() -> None:
    await asyncio.sleep(0.01)
    raise LookupError("nobody expects this")


async def _returns_early() -> None:
    await asyncio.sleep(0.01)


async def _hangs() -> None:
    beat()
    await asyncio.Event().wait()


def test_a_failed_loop_stops_the_process_after_its_drain(
    capsys: pytest.CaptureFixture[str],
) -> None:
    drained: list[str] = []

    async def main(stop: Stop) -> None:
        task = essential(_boom(), "the-loop", stop)
        await stop.wait()
        drained.append("drained")  # main still runs its shutdown to the end
        await asyncio.gather(task, return_exceptions=True)

    assert run("svc", main) == EXIT_FAILED
    assert drained == ["drained"]
    err = capsys.readouterr().err
    assert err.endswith(
        "svc: stopped after a failure: the-loop failed: LookupError('nobody expects this')\n"
    ), err


def test_run_stops_a_process_whose_loop_hangs(capsys: pytest.CaptureFixture[str]) -> None:
    """run()'s own watchdog (shared.liveness's tests have the rest), on the real clock:
    the loop's bound is 0.2 s, and the drain waits for the loop the watchdog cancels."""
    drained: list[str] = []

    async def main(stop: Stop) -> None:
        task = essential(_hangs(), "stuck", stop, liveness=Liveness(), within=0.2)
        await stop.wait()
        await asyncio.wait({task})
        drained.append("drained")

    assert run("svc", main) == EXIT_FAILED
    assert drained == ["drained"]
    err = capsys.readouterr().err
    assert err.endswith(
        "svc: stopped after a failure: stuck hung: no turn within its bound (shared.liveness)\n"
    ), err


def test_a_loop_that_returns_before_the_stop_is_a_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def main(stop: Stop) -> None:
        essential(_returns_early(), "quitter", stop)
        await stop.wait()

    assert run("svc", main) == EXIT_FAILED
    assert "svc: stopped after a failure: quitter ended on its own" in capsys.readouterr().err


def test_the_first_failure_is_the_one_told(capsys: pytest.CaptureFixture[str]) -> None:
    async def main(stop: Stop) -> None:
        first = essential(_boom(), "first", stop)
        await stop.wait()
        essential(_boom(), "second", stop)
        await asyncio.sleep(0.05)
        await asyncio.gather(first, return_exceptions=True)

    assert run("svc", main) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "first failed" in err and "second" not in err.splitlines()[-1], err


def test_a_drained_or_cancelled_loop_is_no_failure() -> None:
    async def main(stop: Stop) -> None:
        jobs_stop = asyncio.Event()

        async def until(event: asyncio.Event) -> None:
            await event.wait()

        drained = essential(until(jobs_stop), "drains-at-stop", stop)
        forever = essential(until(asyncio.Event()), "runs-until-cancelled", stop)
        stop.set()  # as SIGTERM does
        jobs_stop.set()
        forever.cancel()
        await asyncio.gather(drained, forever, return_exceptions=True)
        await asyncio.sleep(0)  # the done callbacks have run
        assert stop.failure is None

    assert run("svc", main) == 0


def test_without_a_stop_it_is_a_plain_task() -> None:
    async def main(_: Stop) -> None:
        task = essential(_boom(), "unsupervised", None)
        with pytest.raises(LookupError):
            await task

    assert run("svc", main) == 0


async def test_waiting_for_a_dependency_ends_at_a_configuration_error() -> None:
    """A ConfigError (a database that does not exist) is no outage to wait out: raised at
    the first try, not retried for the start timeout."""
    tries: list[int] = []

    async def connect() -> None:
        tries.append(1)
        raise ConfigError('database "x" does not exist: run `longhaul migrate` first')

    with pytest.raises(ConfigError, match="run `longhaul migrate` first"):
        await wait_for_dependency("PostgreSQL", connect, timeout=5)
    assert len(tries) == 1


def test_a_loop_a_failed_start_stops_is_no_failure(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A start that fails after a loop began (the API's port in use) stops the loop by
    its own event, ``stop`` unset: the start's error is told, alone, and no critical."""

    async def main(stop: Stop) -> None:
        jobs_stop = asyncio.Event()

        async def until(event: asyncio.Event) -> None:
            await event.wait()

        loop = essential(until(jobs_stop), "monitor", stop, until=jobs_stop)
        try:
            raise ConfigError("cannot listen on 127.0.0.1:1 (PORT): Address already in use")
        finally:  # the cleanup of what started
            jobs_stop.set()
            await asyncio.gather(loop, return_exceptions=True)
            await asyncio.sleep(0)  # the done callbacks have run

    assert run("svc", main) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        "svc: cannot listen on 127.0.0.1:1 (PORT): Address already in use\n"
    )
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_second_signal_cuts_the_stop_delay_short() -> None:
    """The first SIGTERM/SIGINT stops the process and its delay begins; the next one
    ends the delay, however long it was to be."""
    stop = Stop()
    stop.signalled()
    assert stop.is_set() and not stop.hurry.is_set()
    delay = asyncio.create_task(stop_delay(stop, 300, "svc"))
    await asyncio.sleep(0)  # waiting out the delay
    assert not delay.done()
    stop.signalled()
    async with asyncio.timeout(10):
        await delay


async def test_a_failure_skips_the_stop_delay_or_ends_it() -> None:
    """Serving on without what failed helps nobody: a failure before the delay skips it,
    one during the delay ends it."""
    failed = Stop()
    failed.fail("relay failed")
    async with asyncio.timeout(10):
        await stop_delay(failed, 300, "svc")
    stop = Stop()
    stop.signalled()
    delay = asyncio.create_task(stop_delay(stop, 300, "svc"))
    await asyncio.sleep(0)
    assert not delay.done()
    stop.fail("hub failed")
    async with asyncio.timeout(10):
        await delay


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (TimeoutError(), "no answer in time"),
        (asyncpg.QueryCanceledError("canceled"), "QueryCanceledError: canceled"),
    ],
)
def test_a_start_step_postgresql_fails_says_what_was_not_done(error: Exception, says: str) -> None:
    with pytest.raises(DependencyError) as raised, db.starting("schema version not read"):
        raise error
    assert str(raised.value) == f"PostgreSQL: schema version not read: {says}"


def test_a_stop_while_waiting_for_a_dependency_exits_as_a_stop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stop during a try that has not ended (it would have run to its timeout) and
    before the start timeout: no "unreachable", exit code 0, and the try is cancelled."""
    cancelled: list[bool] = []

    async def connect() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main(stop: Stop) -> None:
        asyncio.get_running_loop().call_later(0.1, stop.signalled)
        await wait_for_dependency("RabbitMQ", connect, timeout=60, stop=stop)

    assert run("svc", main) == 0
    assert capsys.readouterr().err == "svc: stopped while waiting for RabbitMQ\n"
    assert cancelled == [True]


_STUBBORN = """
import asyncio, sys
from shared.lifecycle import run

async def stubborn():
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            continue

async def main(stop):
    print("ready", flush=True)
    await stop.wait()
    {how}

sys.exit(run("svc", main, drain_s=0.5))
"""


@pytest.mark.parametrize(
    "how",
    [
        "await stubborn()",  # a step of the drain
        "asyncio.create_task(stubborn())",  # left running: the event loop's close waits
    ],
)
def test_a_drain_past_its_bound_ends_the_process(how: str) -> None:
    """As a process: the drain, up to the event loop's own close, is given its bound,
    then the process ends at once, exit 4, one line saying why."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUBBORN.format(how=how)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_FAILED, err
    assert err.strip().splitlines() == [
        "the drain did not end within 0.5s (something ignores its cancellation): exiting"
    ]


@pytest.mark.parametrize(
    ("module", "bound"),
    [
        # The stop delay, the requests' two shutdown windows, 12 steps of 2 timeouts.
        ("services.api.__main__", 3 + 2 * 11 + 12 * 2 * 3 + 10),
        # The grace, two cancel graces, 24 steps of 2 timeouts (2 s and a second each).
        ("services.worker.__main__", 7 + 2 * 1 + 24 * 2 * 3 + 10),
        # The stop delay, two close timeouts and a second each, 10 steps.
        ("services.ws_gateway.__main__", 3 + 2 * 5 + 10 * 2 * 3 + 10),
    ],
)
def test_each_service_gives_its_drain_its_bound(
    module: str, bound: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service's process runs with the drain bound its settings make of them."""
    for name, value in {
        "SHUTDOWN_GRACE_S": "7",
        "CANCEL_GRACE_S": "1",
        "STOP_DELAY_S": "3",
        "IO_TIMEOUT_S": "2",
        "CLOSE_TIMEOUT_S": "4",
    }.items():
        monkeypatch.setenv(f"LONGHAUL_{name}", value)
    entry = importlib.import_module(module)
    given: dict[str, Any] = {}

    def fake_run(service: str, main: object, *, drain_s: float | None = None) -> int:
        given["drain_s"] = drain_s
        return 0

    monkeypatch.setattr(entry, "run", fake_run)
    monkeypatch.setattr(entry, "setup_logging", lambda *_: None)  # the session's stays
    assert (entry.main([]) if module.startswith("services.worker") else entry.main()) == 0
    assert given["drain_s"] == bound
