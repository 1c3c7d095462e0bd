"""How a service process starts and stops: one code path for all three.

``run(service, main)`` builds nothing itself; ``main(stop)`` receives an event set on
SIGTERM/SIGINT and must return once it has drained. A configuration error or a
dependency that stays unreachable for the start timeout ends the process with one line
on stderr and a non-zero exit code. So does a background loop the process cannot do
without (``essential``) that ends on its own: the process drains and exits for its
supervisor to restart it, rather than run on without its relay or its lease renewal.
So does one that hangs (shared.liveness), told by a watchdog thread, which also ends a
drain that outlasts the service's bound (something ignores its cancellation). A SIGTERM/SIGINT
while the start waits for a dependency ends it at once, with one line and the exit code
of any stop (0)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from shared.errors import ConfigError, DependencyError, StartStopped, StartTimeout
from shared.liveness import Liveness

log = logging.getLogger(__name__)
T = TypeVar("T")

EXIT_CONFIG = 2
EXIT_DEPENDENCY = 3
EXIT_FAILED = 4


class Stop(asyncio.Event):
    """A process's stop signal: set on SIGTERM/SIGINT, or by ``fail`` when something the
    process cannot run without has ended. Either way the process drains and stops.

    ``hurry`` is set by a second signal, or by a failure: a stop delay
    (``stop_delay``) ends then."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: str | None = None
        self.hurry = asyncio.Event()
        # The essential loops started with this stop that beat, and their beats: for
        # the watchdog (run). Each leaves once it ended.
        self.watched: dict[asyncio.Task[None], Liveness] = {}

    def signalled(self) -> None:
        """SIGTERM/SIGINT: the first stops the process, the next one hurries it."""
        if self.is_set():
            self.hurry.set()
        self.set()

    def fail(self, why: str) -> None:
        if self.failure is None:  # the first cause is the one worth telling
            self.failure = why
        self.set()
        # Serving on (a stop delay) without what failed helps no client.
        self.hurry.set()


async def stop_delay(stop: Stop, delay_s: float, service: str) -> None:
    """Once ``stop`` is set, wait ``delay_s`` (LONGHAUL_STOP_DELAY_S) before the caller
    stops listening. The process serves on meanwhile, its /readyz answering 503, so a
    load balancer that polls it takes the process out of rotation before its port
    closes. No delay after a failure; a second signal, or a failure meanwhile, ends it."""
    if not delay_s or stop.failure is not None:
        return
    log.info("%s stopping: not ready, serving on", service, extra={"for_s": delay_s})
    try:
        async with asyncio.timeout(delay_s):
            await stop.hurry.wait()
    except TimeoutError:
        return
    why = stop.failure or "a second signal"
    log.info("%s stop delay cut short: %s", service, why, extra={"why": why})


def essential(
    coro: Coroutine[Any, Any, None],
    name: str,
    stop: Stop | None,
    *,
    until: asyncio.Event | None = None,
    liveness: Liveness | None = None,
    within: float | None = None,
) -> asyncio.Task[None]:
    """Start a background loop the process cannot do without. Should it end before
    ``stop`` (or ``until``, the event the loop itself returns at) is set, or raise at any
    time, ``stop`` fails: the process drains and exits non-zero. Cancelling it (a
    shutdown's way to end it) is no failure. Without a ``stop`` (an app built in a test)
    it is a plain task.

    ``until``: a start that fails after the loop began (a port in use) ends it with
    ``stop`` unset; it returned as asked, and the start's own error is the one to tell.

    ``liveness`` and ``within``: the loop beats (shared.liveness.beat) at least every
    ``within`` seconds, else /healthz names it hung and the watchdog of ``run`` fails
    ``stop``; once it ended it is no longer watched."""
    if liveness is None or within is None:
        task = asyncio.create_task(coro, name=name)
    else:
        task = asyncio.create_task(coro, name=name, context=liveness.context(name, within))
        task.add_done_callback(lambda _: liveness.forget(name))
        if stop is not None:
            stop.watched[task] = liveness
            task.add_done_callback(stop.watched.pop)
    if stop is not None:
        task.add_done_callback(functools.partial(_ended, stop, until))
    return task


def _ended(stop: Stop, until: asyncio.Event | None, task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None and (stop.is_set() or (until is not None and until.is_set())):
        return  # drained, as asked
    name = task.get_name()
    why = f"{name} failed: {_cause(exc)}" if exc is not None else f"{name} ended on its own"
    log.critical("essential background task ended: stopping", extra={"task": name}, exc_info=exc)
    stop.fail(why)


def _cause(exc: BaseException) -> str:
    # A TaskGroup wraps what its tasks raised: tell those.
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(_cause(e) for e in exc.exceptions)
    return repr(exc)


# How long exit_now gives its last line: a log handler it waits on (a full stderr
# pipe, its lock held by the thread that is stuck) must not keep the process alive.
LAST_LINE_S = 2.0


def exit_now(why: str) -> None:
    """End the process at once, with ``why`` as its last line: for what a drain cannot
    end (a thread, an event loop held by code that never awaits). What it held is
    recovered as after a crash (leases run out, the outbox is polled)."""
    hard = threading.Timer(LAST_LINE_S, os._exit, (EXIT_FAILED,))
    hard.daemon = True
    hard.start()
    log.critical(why)
    logging.shutdown()
    os._exit(EXIT_FAILED)


# How often the watchdog reads the beats: a hang is told at most this much after its
# bound (shared.liveness.stale_after, 15 s or more).
WATCH_PERIOD_S = 1.0
# A watchdog turn this much later than its period: the process was paused (SIGSTOP,
# `docker pause`, a frozen VM), and no loop had a turn meanwhile.
OVERSLEPT_S = 5.0
# The event loop not answering the watchdog's turns for this much longer than a
# period: it was held (code that never awaits), and no loop could have a turn.
HELD_S = 1.0
# How long the event loop may take to begin the drain the watchdog asked for. Longer,
# and code that never awaits holds it: the drain would never run.
UNRESPONSIVE_S = 10.0


class Watchdog:
    """A thread that fails ``stop`` once an essential loop of it is hung, and cancels
    that loop (the drain waits for the loops to end): the process drains and exits 4
    for its supervisor to restart it, as when such a loop ends. Without it only an
    orchestrator polling /healthz would; compose's and systemd's restart policies see
    exits. An event loop held meanwhile (it answers each turn) is named as the cause;
    one that does not take the stop at all ends the process at once.

    Once ``stop`` is set the loops are no longer watched: the drain's steps have their
    own bounds. The drain itself, up to the event loop's close (``returned``, then
    ``close``), is given ``drain_s`` (None: no bound), then the process ends at once: a
    loop or a handler that ignores its cancellation would keep it draining for ever, and
    after a failure no supervisor's stop timeout ends it."""

    def __init__(
        self,
        stop: Stop,
        loop: asyncio.AbstractEventLoop,
        *,
        drain_s: float | None = None,
        period_s: float = WATCH_PERIOD_S,
        unresponsive_s: float = UNRESPONSIVE_S,
        exit_now: Callable[[str], None] = exit_now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``exit_now`` and ``clock`` (what tells a pause): a test's own."""
        self._stop = stop
        self._loop = loop
        self._drain_s = drain_s
        self._period_s = period_s
        self._unresponsive_s = unresponsive_s
        self._exit_now = exit_now
        self._clock = clock
        # Per Liveness, from when (its own clock) its loops' bounds run: a pause's end.
        self._since: dict[Liveness, float] = {}
        # When the event loop last ran a turn's callback (this clock).
        self._answered = clock()
        self._closing = threading.Event()
        # Set once ``main`` returned: what is left is the event loop's own closing.
        self._returned = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="liveness-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def returned(self) -> None:
        """``main`` returned: no loop is watched any more, and what is left (the event
        loop cancels and awaits the tasks still running) counts as the drain."""
        self._returned.set()

    def close(self) -> None:
        """Stop watching; returns once the thread has ended (within a period)."""
        self._closing.set()
        self._thread.join()

    def _watch(self) -> None:
        turned = self._clock()
        while not self._closing.wait(self._period_s):
            now = self._clock()
            overslept, turned = self._paused(now, turned), now
            if self._stop.is_set() or self._returned.is_set():
                self._bound_drain(now, overslept)
                return
            if overslept:
                self._answered = now
            try:
                hung = self._hung(overslept)
            except Exception:
                # A bug here must not end the watching.
                log.exception("the liveness watchdog's turn failed")
                continue
            if hung:
                if self._fail(hung, held_s=now - self._answered):
                    self._bound_drain(self._clock(), overslept=False)
                return
            try:
                self._loop.call_soon_threadsafe(self._answer)
            except RuntimeError:
                continue  # the event loop closed meanwhile: main returned (see returned)

    def _bound_drain(self, since: float, overslept: bool) -> None:
        """Give the drain, under way since about ``since``, its bound; then end the process,
        unless it returned first (close). A pause restarts the bound, as it does the
        loops'."""
        if self._drain_s is None:
            return
        turned = since
        while not self._closing.wait(self._period_s):
            now = self._clock()
            if overslept or self._paused(now, turned):
                since, overslept = now, False
            turned = now
            if now - since >= self._drain_s:
                cause = f" after a failure ({self._stop.failure})" if self._stop.failure else ""
                self._exit_now(
                    f"the drain{cause} did not end within {self._drain_s:g}s (something"
                    " ignores its cancellation): exiting"
                )
                return

    def _paused(self, now: float, turned: float) -> bool:
        """Whether this turn came so late after the last one (at ``turned``) that the
        process was paused meanwhile, and no loop had a turn."""
        return now - turned > self._period_s + OVERSLEPT_S

    def _answer(self) -> None:
        self._answered = self._clock()

    def _hung(self, overslept: bool) -> list[asyncio.Task[None]]:
        # Copies: the event loop adds and removes loops meanwhile.
        watched = tuple(self._stop.watched.items())
        if overslept:
            # Every bound runs again from now, or each loop would be taken for hung
            # before it had a turn.
            self._since = {beats: beats.now() for beats in {b for _, b in watched}}
        return [
            task
            for task, beats in watched
            if task.get_name() in beats.stale(self._since.get(beats))
        ]

    def _fail(self, hung: list[asyncio.Task[None]], held_s: float) -> bool:
        """Whether the event loop took the stop (else the process is ending, or ends)."""
        names = ", ".join(sorted(task.get_name() for task in hung))
        why = f"{names} hung: no turn within its bound (shared.liveness)"
        if held_s > self._period_s + HELD_S:
            # Nothing had a turn, the loops named included: not theirs to answer for.
            why = (
                f"the event loop was held for {held_s:.0f}s (code that never awaits):"
                f" {names} had no turn within its bound (shared.liveness)"
            )
        asked = time.monotonic()
        taken = threading.Event()

        def fail() -> None:
            taken.set()
            if self._stop.is_set():
                return  # stopping already (a signal came first): its drain goes on
            log.critical("essential background task hung: stopping", extra={"why": why})
            self._stop.fail(why)
            for task in hung:
                task.cancel()  # its await ends; a cancelled loop is no further failure

        try:
            self._loop.call_soon_threadsafe(fail)
        except RuntimeError:
            return False  # the event loop closed meanwhile: the process is ending
        # In steps: close() (the process stopping meanwhile) must not wait on this.
        while not taken.wait(min(self._period_s, 0.1)):
            if self._closing.is_set():
                return False
            if time.monotonic() - asked >= self._unresponsive_s:
                self._exit_now(
                    f"{why}; the event loop did not take the stop within"
                    f" {self._unresponsive_s:g}s (held by code that never awaits): exiting"
                )
                return False
        return True


def run(
    service: str, main: Callable[[Stop], Awaitable[None]], *, drain_s: float | None = None
) -> int:
    """Run ``main`` under uvloop (where available) with signal handling and the watchdog;
    return the exit code. ``drain_s``: how long the process may take to end once stopped
    (``main``'s drain and the event loop's close; its settings' ``drain_bound_s``), else
    it ends at once (exit 4), what it held recovered as after a crash."""
    stop = Stop()

    async def supervised() -> None:
        _tune_gc()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # The handler only sets events: the draining happens in main.
            loop.add_signal_handler(sig, stop.signalled)
        watchdog = Watchdog(stop, loop, drain_s=drain_s)
        watchdogs.append(watchdog)
        watchdog.start()
        try:
            await main(stop)
        finally:
            watchdog.returned()

    # Closed once the event loop is: closing, it cancels the tasks still running and
    # waits for them, which a task that ignores its cancellation makes for ever.
    watchdogs: list[Watchdog] = []
    try:
        try:
            import uvloop  # noqa: PLC0415 - optional speed-up

            uvloop.run(supervised())
        except ImportError:
            asyncio.run(supervised())
        finally:
            for watchdog in watchdogs:
                watchdog.close()
    except ConfigError as exc:
        sys.stderr.write(f"{service}: {exc}\n")
        return EXIT_CONFIG
    except DependencyError as exc:
        sys.stderr.write(f"{service}: {exc}\n")
        return EXIT_DEPENDENCY
    except StartStopped as exc:
        # A failure that set the stop is the one to tell, below.
        if stop.failure is None:
            sys.stderr.write(f"{service}: {exc}\n")
            return 0
    if stop.failure is not None:
        sys.stderr.write(f"{service}: stopped after a failure: {stop.failure}\n")
        return EXIT_FAILED
    return 0


def _tune_gc() -> None:
    """Every task allocates a few hundred short-lived containers in each service; with
    the default threshold (700) the cyclic collector ran every few tasks and cost the
    worker 5-8 % of its CPU (bench/README.md). What was loaded at start (modules,
    schemas, settings) is frozen: full collections no longer walk it."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def wait_for_dependency(
    name: str,
    connect: Callable[[], Awaitable[T]],
    timeout: float,
    stop: asyncio.Event | None = None,
) -> T:
    """Call ``connect`` until it succeeds, backing off, for at most ``timeout`` seconds.

    Raises StartTimeout with one line naming the dependency and the last error. A
    ConfigError from ``connect`` (a database that does not exist) is raised at once:
    waiting does not mend a setting. ``stop`` set meanwhile (SIGTERM/SIGINT) ends the
    wait at once, a try in progress included: StartStopped."""
    return await until_stopped(stop, _retried(name, connect, timeout), name)


async def until_stopped(stop: asyncio.Event | None, waiting: Awaitable[T], name: str) -> T:
    """What ``waiting`` (a start's wait for ``name``) returns or raises; should ``stop``
    be set first, it is cancelled, and StartStopped says the wait was stopped. It had
    gone on to its end, a connect's timeout or the start timeout, then blamed ``name``."""
    if stop is None:
        return await waiting
    task = asyncio.ensure_future(waiting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its clean-up (a half-open connection) done
    if task.cancelled() and stop.is_set():
        raise StartStopped(f"stopped while waiting for {name}")
    return task.result()


async def _retried(name: str, connect: Callable[[], Awaitable[T]], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            return await asyncio.wait_for(connect(), max(0.1, deadline - time.monotonic()))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001
            # Any failure to connect is "not reachable yet"; the error names the last one
            # (by its type alone when it says nothing: a timeout's "TimeoutError:" read
            # as if its reason had been cut off).
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if time.monotonic() + delay >= deadline:
                raise StartTimeout(
                    f"{name} unreachable for {timeout:.0f}s (LONGHAUL_START_TIMEOUT_S): {last}"
                ) from None
            # The text names them too: the CLI's plain log lines show no extra fields.
            log.warning("waiting for %s: %s", name, last, extra={"dependency": name, "error": last})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


@contextlib.contextmanager
def listening(host: str, port: int, settings: str) -> Iterator[None]:
    """Around binding a listening socket: a port in use or an address this machine does
    not have is a configuration error, told in one line that names the settings."""
    try:
        yield
    except OSError as exc:
        # uvloop's strerror repeats the address; the C library's text does not. A host
        # name that does not resolve has a resolver's code, not an errno.
        if isinstance(exc, socket.gaierror) or not exc.errno:
            reason = exc.strerror or str(exc)
        else:
            reason = os.strerror(exc.errno)
        raise ConfigError(f"cannot listen on {host}:{port} ({settings}): {reason}") from None
