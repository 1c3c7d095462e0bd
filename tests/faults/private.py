"""Private RabbitMQ, Redis and PostgreSQL instances on free ports in temp dirs, for the
faults that restart a dependency (and, for Redis, any test that stops, pauses or
configures it). The shared services on the standard ports are used by other runs and
are never stopped or restarted by this suite.

Each instance is started, stopped and started again on the same port with the same data,
and ``close()`` (idempotent) brings it down for good and removes its files."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import ARTIFACTS, free_port, timeout


def _log(name: str) -> Path:
    (ARTIFACTS / "logs").mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / "logs" / f"{name}-{secrets.token_hex(3)}.log"


def _wait(check: object, within: float, what: str) -> None:
    """Until ``check()`` is true, at most ``within`` seconds scaled for a slow machine
    (LONGHAUL_TEST_TIMEOUT_SCALE, as every wait of the suite)."""
    within = timeout(within)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"private {what} did not come up within {within:.0f}s")


class PrivateRedis:
    """Nothing kept on disk: a restart starts it empty. Also a context manager that
    starts it and closes it."""

    def __init__(self, *options: str) -> None:
        """``options``: more of redis-server's command-line options."""
        self.options = options
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lhfault-redis-")
        self.log_path = _log("redis")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir, *self.options],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait(self._ping, 20, "Redis")

    def _ping(self) -> bool:
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
        )
        # One with --requirepass answers too: with a refusal.
        return result.stdout.strip() == b"PONG" or result.stdout.startswith(b"NOAUTH")

    def pause(self) -> None:
        """SIGSTOP: connects still succeed (the kernel accepts them) and nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class PrivatePostgres:
    """initdb + pg_ctl as the ``postgres`` OS user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.dir = tempfile.mkdtemp(prefix="lhfault-pg-")
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.log_path = _log("postgres")
        self.initialized = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/longhaul"

    def _as_postgres(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd], capture_output=True, check=check
        )

    def start(self) -> None:
        if not self.initialized:
            self._as_postgres(
                f"{self.bin}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--no-sync"
            )
            self.initialized = True
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = self._as_postgres(
            f"{self.bin}/pg_ctl", "-D", self.data, "-o", options,
            "-l", os.path.join(self.dir, "server.log"), "-w", "-t", "60", "start",
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(
            f"{self.bin}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False
        )

    def close(self) -> None:
        if self.initialized:
            self.stop("immediate")
            with contextlib.suppress(OSError):
                shutil.copy(os.path.join(self.dir, "server.log"), self.log_path)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A second RabbitMQ node with its own name, ports, data dir and Erlang cookie (its
    own HOME), run as root straight from /usr/lib/rabbitmq/bin (the /usr/sbin wrappers
    switch to the ``rabbitmq`` user and the shared node's cookie)."""

    BIN = "/usr/lib/rabbitmq/bin"

    def __init__(self, advanced_config: str | None = None) -> None:
        """``advanced_config``: the text of an Erlang-terms ``advanced.config`` for this
        node (e.g. ``[{rabbit, [{consumer_timeout, 3000}]}].``); none by default."""
        self.node = f"lhfault{secrets.token_hex(3)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lhfault-rabbit-")
        Path(self.dir, "enabled_plugins").write_text("")
        if advanced_config is not None:
            Path(self.dir, "advanced.config").write_text(advanced_config)
        self.log_path = _log("rabbitmq")
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "HOME": self.dir,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(self.dir, "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.dir, "rabbitmq-env.conf"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [f"{self.BIN}/rabbitmqctl", "-n", self.node, *args],
            env=self.env, capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [f"{self.BIN}/rabbitmq-server"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        _wait(lambda: self.ctl("await_startup", timeout=30).returncode == 0, 90, "RabbitMQ")

    def stop(self) -> None:
        self.ctl("stop")
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def broker_log(self) -> str:
        """The node's own log file(s) (under RABBITMQ_LOG_BASE), e.g. channel errors."""
        texts = []
        for path in sorted(Path(self.dir, "log").glob("*.log")):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def consumers(self, queue: str) -> int:
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "consumers").stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return 0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", timeout=30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def missing_for_private_servers() -> str | None:
    """What this machine lacks to run the tests' private servers (their own Redis,
    PostgreSQL and RabbitMQ on other ports), or None. They run the servers' own binaries
    and PostgreSQL as its user, so the tests need those packages and root."""
    missing = [
        name
        for name, present in (
            ("redis-server", shutil.which("redis-server") is not None),
            ("/usr/lib/postgresql/*/bin", bool(glob.glob("/usr/lib/postgresql/*/bin"))),
            (PrivateRabbit.BIN, os.path.isdir(PrivateRabbit.BIN)),
            ("root (runuser -u postgres)", os.geteuid() == 0),
        )
        if not present
    ]
    if not missing:
        return None
    return (
        "the fault tests run private Redis, PostgreSQL and RabbitMQ servers; this machine"
        f" lacks: {', '.join(missing)} (Debian: apt-get install redis-server postgresql"
        " rabbitmq-server, and run make test as root)"
    )
