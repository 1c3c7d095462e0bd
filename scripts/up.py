"""``make up``: run api, worker and ws_gateway as children until Ctrl-C, with a dev API key.

Run after ``make install services migrate`` (the Makefile does that). The dev key is
``LONGHAUL_DEV_API_KEY`` when set (registered for the tenant ``dev`` if this database
does not know it yet); otherwise it is created once and kept in ``.run/dev-api-key``,
and reused while it is still a valid, unrevoked key of this database. On Ctrl-C or
SIGTERM every child gets SIGTERM and is waited for (they drain); a second Ctrl-C kills
them. If a child dies on its own, the
others are stopped and this exits non-zero, naming it."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.api.settings import ApiSettings
from services.worker.settings import WorkerSettings
from services.ws_gateway.settings import GatewaySettings
from shared import keys
from shared.db import ANY_PG_ERROR, redacted
from shared.errors import ConfigError
from shared.settings import CommonSettings, load, reachable_host, url_of

ROOT = Path(__file__).resolve().parent.parent
# Past their own start timeout a service exits by itself; this is only a backstop.
START_MARGIN_S = 30.0
# How long a child may drain after SIGTERM before it is killed.
STOP_WAIT_S = 120.0


class UpError(Exception):
    """A failure `make up` reports as one line and exit status 1."""


@dataclass
class Child:
    name: str
    module: str
    host: str
    port: int
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signum)


def _children(worker_args: list[str]) -> tuple[list[Child], str]:
    """The three services and the console URL, from the same settings they will read."""
    api = load(ApiSettings)
    worker = load(WorkerSettings)
    gateway = load(GatewaySettings)
    children = [
        Child("api", "services.api", reachable_host(api.api_host), api.api_port, []),
        Child(
            "worker",
            "services.worker",
            reachable_host(worker.worker_metrics_host),
            worker.worker_metrics_port,
            worker_args,
        ),
        Child(
            "ws_gateway",
            "services.ws_gateway",
            reachable_host(gateway.gateway_host),
            gateway.gateway_port,
            [],
        ),
    ]
    return children, url_of("http", api.api_host, api.api_port, 8000) + "/"


# --- the dev API key -----------------------------------------------------------------


async def _key_is_valid(database_url: str, key: str, timeout: float) -> bool:
    parsed = keys.parse(key)
    if parsed is None:
        return False
    conn = await asyncpg.connect(database_url, timeout=timeout)
    try:
        secret_hash = await conn.fetchval(
            "SELECT secret_hash FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL",
            parsed.key_id,
        )
    finally:
        await conn.close()
    return secret_hash is not None and keys.verify(parsed, bytes(secret_hash))


def _valid(settings: CommonSettings, key: str) -> bool:
    try:
        return asyncio.run(_key_is_valid(settings.database_url, key, settings.start_timeout_s))
    except ANY_PG_ERROR as exc:
        raise UpError(f"PostgreSQL at {redacted(settings.database_url)}: {exc}") from exc


def _create_key(settings: CommonSettings, *extra: str, stdin: str = "") -> str:
    """``longhaul keys create --tenant dev`` with ``extra`` (and ``stdin``): the key it
    prints."""
    # Our own CLI, with this module's arguments.
    created = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "shared.cli", "keys", "create", "--tenant", "dev", *extra],
        cwd=ROOT,
        env={**os.environ, "LONGHAUL_DATABASE_URL": settings.database_url},
        input=stdin.encode(),
        capture_output=True,
        check=False,
    )
    lines = created.stdout.decode().strip().splitlines()
    if created.returncode != 0 or not lines or keys.parse(lines[-1]) is None:
        why = created.stderr.decode().strip().splitlines()[-1:] or [""]
        raise UpError(f"`longhaul keys create` failed (exit {created.returncode}) {why[0]}")
    return lines[-1]


def dev_key(settings: CommonSettings, state_dir: Path, given: str | None = None) -> str:
    """``given`` (LONGHAUL_DEV_API_KEY), registered if this database does not know it;
    else the stored dev key if this database still accepts it, else a new one (stored)."""
    if given:
        if keys.parse(given) is None:
            raise UpError(
                "LONGHAUL_DEV_API_KEY is not a Longhaul API key (lh_<label>_<12 id chars>_<secret>)"
            )
        if _valid(settings, given):
            return given
        # On stdin: an argument would show the secret in every process listing.
        return _create_key(settings, "--key", "-", stdin=given + "\n")
    path = state_dir / "dev-api-key"
    if path.exists():
        stored = path.read_text().strip()
        if _valid(settings, stored):
            return stored
        print(f"up: {path} holds a key this database does not know; creating a new one")
    key = _create_key(settings, "--label", "dev")
    state_dir.mkdir(parents=True, exist_ok=True)
    # The file holds a secret: readable by its owner only, from the moment it exists.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


# --- the children --------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if `make up` itself dies (even by SIGKILL)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start(child: Child, env: dict[str, str]) -> None:
    child.proc = subprocess.Popen(  # noqa: S603 (our own modules; args from our own CLI)
        [sys.executable, "-m", child.module, *child.args],
        cwd=ROOT,
        env=env,
        # Their own process group: Ctrl-C reaches only us, and we stop them with SIGTERM
        # (the signal every service drains on) in a known order.
        process_group=0,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads run yet in this process)
    )


def port_is_free(child: Child) -> None:
    """Before starting anything: a port another server holds would answer our health
    checks, and `make up` would announce that server as ours."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((child.host, child.port))
        except OSError as exc:
            raise UpError(
                f"{child.name}: {child.host}:{child.port} is taken ({exc.strerror}); "
                "stop what listens there or set its LONGHAUL_*_PORT"
            ) from None


def healthy(child: Child) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://{child.host}:{child.port}/healthz", timeout=1
        ) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def exit_status(child: Child) -> str:
    assert child.proc is not None
    code = child.proc.returncode
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


class Stopper:
    """Signal handlers only count signals and wake the main loop (no work in handlers)."""

    def __init__(self) -> None:
        self.requests = 0
        self.wake = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: self.wake.set())

    def _on_stop(self, *_: object) -> None:
        self.requests += 1
        self.wake.set()

    def sleep(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.wake.clear()


def wait_healthy(children: list[Child], stopper: Stopper, within: float) -> None:
    pending = list(children)
    deadline = time.monotonic() + within
    while pending:
        for child in pending:
            if not child.alive():
                raise UpError(f"{child.name} exited during start ({exit_status(child)})")
        if stopper.requests:
            return
        pending = [c for c in pending if not healthy(c)]
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{c.name} (:{c.port})" for c in pending)
            raise UpError(f"no answer from /healthz of {names} within {within:.0f} s")
        if pending:
            stopper.sleep(0.2)


def stop(children: list[Child], stopper: Stopper) -> list[Child]:
    """SIGTERM to all, wait for them to drain; returns those that did not exit 0."""
    for child in children:
        child.signal(signal.SIGTERM)
    seen = stopper.requests
    deadline = time.monotonic() + STOP_WAIT_S
    while any(c.alive() for c in children):
        if stopper.requests > seen or time.monotonic() > deadline:
            print("up: killing what is still running", flush=True)
            for child in children:
                child.signal(signal.SIGKILL)
        stopper.sleep(0.2)
    for child in children:
        if child.proc is not None:
            child.proc.wait()
    return [c for c in children if c.proc is not None and c.proc.returncode != 0]


def run(worker_args: list[str], state_dir: Path) -> int:
    settings = load(CommonSettings)
    children, console = _children(worker_args)
    for child in children:
        port_is_free(child)
    given = os.environ.get("LONGHAUL_DEV_API_KEY", "").strip() or None
    key = dev_key(settings, state_dir, given)
    where_key = "LONGHAUL_DEV_API_KEY" if given else f"also in {state_dir / 'dev-api-key'}"
    env = dict(os.environ)
    env.setdefault("LONGHAUL_LOG_FORMAT", "text")  # a terminal, not a log shipper

    stopper = Stopper()
    failure: str | None = None
    try:
        for child in children:
            start(child, env)
        wait_healthy(children, stopper, settings.start_timeout_s + START_MARGIN_S)
        if not stopper.requests:
            print(
                f"\nLonghaul is up: api :{children[0].port}, worker :{children[1].port}, "
                f"ws_gateway :{children[2].port}\n"
                f"  console      {console}#key={key}\n"
                f"  dev API key  {key}   ({where_key})\n"
                "Ctrl-C stops everything.\n",
                flush=True,
            )
        while not stopper.requests:
            dead = [c for c in children if c.proc is not None and not c.alive()]
            if dead:
                failure = f"{dead[0].name} exited unexpectedly ({exit_status(dead[0])})"
                break
            stopper.sleep(1.0)
    except UpError as exc:
        failure = str(exc)
    finally:
        print("up: stopping api, worker and ws_gateway", flush=True)
        unclean = stop(children, stopper)
    if failure:
        print(f"up: {failure}; stopped the others", file=sys.stderr)
        return 1
    if unclean:
        names = ", ".join(f"{c.name} ({exit_status(c)})" for c in unclean)
        print(f"up: did not stop cleanly: {names}", file=sys.stderr)
        return 1
    print("up: stopped")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/up.py", description=__doc__)
    parser.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of task types for the worker (repeatable)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=ROOT / ".run",
        help="where the dev API key is kept (default: .run/)",
    )
    args = parser.parse_args()
    worker_args = [a for module in args.tasks for a in ("--tasks", module)]
    try:
        return run(worker_args, args.state_dir)
    except (ConfigError, UpError) as exc:
        print(f"up: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
