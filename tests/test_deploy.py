"""Deployment files (docker-compose.yml, the Dockerfiles, Makefile, .ci/run, scripts/),
checked without a Docker engine, and each image's command run on the host as it would
run in its container."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import yaml

from services.worker.settings import WorkerSettings
from services.ws_gateway.settings import GatewaySettings
from shared import keys
from shared.settings import CommonSettings
from tests.support import ARTIFACTS, ROOT, eventually, running, timeout

# Compose service -> (settings class, the settings field of the port its /healthz is on).
APP_SERVICES = {
    "api": ("services.api.settings:ApiSettings", "api_port"),
    "worker": ("services.worker.settings:WorkerSettings", "worker_metrics_port"),
    "ws_gateway": ("services.ws_gateway.settings:GatewaySettings", "gateway_port"),
}
INFRA_SERVICES = {"rabbitmq", "redis", "postgres"}
HEALTHY = "service_healthy"
COMPLETED = "service_completed_successfully"


def settings_class(service: str) -> type[CommonSettings]:
    if service == "migrate":  # runs `longhaul migrate`, which reads CommonSettings
        return CommonSettings
    module, _, name = APP_SERVICES[service][0].partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, CommonSettings)
    return cls


def env_names(cls: type[CommonSettings]) -> set[str]:
    return {f"LONGHAUL_{field.upper()}" for field in cls.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A compose ``environment:`` in either of its forms, as a mapping."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def dockerfile(service: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of services/<name>/Dockerfile, continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "services" / service / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment lines inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"services/{service}/Dockerfile ends inside a continued line"
    return instructions


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def container_command(service: str) -> list[str]:
    cmds = [args for keyword, args in dockerfile(service) if keyword == "CMD"]
    assert cmds, f"services/{service}/Dockerfile has no CMD"
    command = json.loads(cmds[-1])  # exec form: no shell between docker and python (signals)
    assert isinstance(command, list)
    return [str(part) for part in command]


def has_healthcheck(services: dict[str, dict[str, Any]], name: str) -> bool:
    check = services[name].get("healthcheck")
    if check is not None:
        return not check.get("disable", False) and bool(check.get("test"))
    build = services[name].get("build")
    if build is None:
        return False
    path = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    return any(line.startswith("HEALTHCHECK") for line in path.read_text().splitlines())


# --- docker-compose.yml ----------------------------------------------------------------


def test_compose_defines_the_whole_system(services: dict[str, dict[str, Any]]) -> None:
    """Broker, Redis, PostgreSQL, a migration job and the three Longhaul services."""
    assert set(services) >= INFRA_SERVICES | {"migrate"} | set(APP_SERVICES)


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_compose_builds_each_service_from_its_dockerfile(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """Each Longhaul service is built from services/<name>/Dockerfile with the repo as context."""
    build = services[name]["build"]
    assert (ROOT / build["context"]).resolve() == ROOT
    assert build["dockerfile"] == f"services/{name}/Dockerfile"
    assert (ROOT / build["dockerfile"]).is_file()


@pytest.mark.parametrize("name", [*sorted(APP_SERVICES), "migrate"])
def test_compose_env_vars_are_settings_fields(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """A misspelt LONGHAUL_* variable is silently ignored by pydantic-settings: catch it here."""
    known = env_names(settings_class(name))
    used = {k for k in environment(services[name]) if k.startswith("LONGHAUL_")}
    assert used, f"{name} sets no LONGHAUL_* variable"
    assert used <= known, f"{name}: not settings fields: {sorted(used - known)}"


@pytest.mark.parametrize("name", [*sorted(APP_SERVICES), "migrate"])
def test_compose_urls_name_compose_services(services: dict[str, dict[str, Any]], name: str) -> None:
    """Inside the compose network the dependencies are reached by their service names."""
    env = environment(services[name])
    for var, expected in (
        ("LONGHAUL_AMQP_URL", "rabbitmq"),
        ("LONGHAUL_REDIS_URL", "redis"),
        ("LONGHAUL_DATABASE_URL", "postgres"),
    ):
        match = re.match(r"^[a-z]+://(?:[^@/]*@)?([^:/]+)", env.get(var, ""))
        assert match, f"{name}: {var} missing or not a URL"
        assert match[1] == expected, f"{name}: {var} points at {match[1]}, not {expected}"


def test_compose_depends_on_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    """No service starts before what it needs is healthy (or, for migrate, done)."""
    for name, service in services.items():
        depends = service.get("depends_on", {})
        # The list form means only "container started", which is not ready.
        assert isinstance(depends, dict), f"{name}: depends_on must use conditions"
        for target, spec in depends.items():
            condition = spec.get("condition")
            if condition == HEALTHY:
                assert has_healthcheck(services, target), f"{name} waits on {target}'s health"
            else:
                assert condition == COMPLETED, f"{name} -> {target}: condition {condition}"
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot"
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert {t: d["condition"] for t, d in depends.items()} == {
            **dict.fromkeys(INFRA_SERVICES, HEALTHY),
            "migrate": COMPLETED,
        }
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == HEALTHY
    assert services["migrate"]["command"] == ["longhaul", "migrate"]


def test_compose_restarts_every_long_running_service(services: dict[str, dict[str, Any]]) -> None:
    """A crashed dependency left down would keep every service at readyz 503; a crashed
    service would stay down. Only the one-shot migrate is not restarted."""
    policies = {n: s.get("restart", "no") for n, s in services.items()}
    assert policies.pop("migrate") == "no"
    assert set(policies.values()) == {"unless-stopped"}, policies


def test_compose_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    """Everything but the one-shot migrate job reports its health."""
    missing = [n for n in services if n != "migrate" and not has_healthcheck(services, n)]
    assert not missing


def test_compose_publishes_api_and_gateway(services: dict[str, dict[str, Any]]) -> None:
    """The console and API on :8000, the WebSocket gateway on :8001, as in the contract."""
    assert "8000:8000" in [str(p) for p in services["api"]["ports"]]
    assert "8001:8001" in [str(p) for p in services["ws_gateway"]["ports"]]
    # Nothing else is exposed: PostgreSQL trusts the compose network.
    assert "ports" not in services["postgres"]


def test_compose_rabbitmq_keeps_its_node_name(services: dict[str, dict[str, Any]]) -> None:
    """The node's data directory is named after rabbit@<hostname>: with compose's random
    hostname a new container would start an empty node beside the old queues."""
    rabbit = services["rabbitmq"]
    assert rabbit.get("hostname") or rabbit.get("environment", {}).get("RABBITMQ_NODENAME")
    assert "/var/lib/rabbitmq" in " ".join(rabbit["volumes"])


def test_compose_gives_the_worker_its_whole_drain(services: dict[str, dict[str, Any]]) -> None:
    """SIGKILL only after the worst case of the drain: the grace for running tasks, the
    hand-back of those still running, and closing the consumers and channels."""
    worker = services["worker"]
    env = worker["environment"]
    settings = WorkerSettings()
    grace = float(env.get("LONGHAUL_SHUTDOWN_GRACE_S", settings.shutdown_grace_s))
    handback = settings.cancel_grace_s + 2 * settings.io_timeout_s
    closing = 3 * settings.io_timeout_s
    assert worker["stop_grace_period"].endswith("s")
    assert float(worker["stop_grace_period"][:-1]) >= grace + handback + closing


def test_compose_gives_the_gateway_its_whole_drain(services: dict[str, dict[str, Any]]) -> None:
    """SIGKILL only after the gateway's worst case: its stop delay, then its clients'
    close twice bounded (a 1001 that drains, then one dropped), with a margin for
    closing its dependencies."""
    gateway = services["ws_gateway"]
    env = gateway["environment"]
    settings = GatewaySettings()
    delay = float(env.get("LONGHAUL_STOP_DELAY_S", settings.stop_delay_s))
    close = float(env.get("LONGHAUL_CLOSE_TIMEOUT_S", settings.close_timeout_s))
    closing = 2 * (close + 1) + settings.io_timeout_s
    assert gateway["stop_grace_period"].endswith("s")
    assert float(gateway["stop_grace_period"][:-1]) >= delay + closing


# --- the Dockerfiles -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_dockerfile_runs_as_non_root(name: str) -> None:
    users = [args for keyword, args in dockerfile(name) if keyword == "USER"]
    assert users, f"services/{name}/Dockerfile has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_dockerfile_healthcheck_probes_healthz_on_the_settings_port(name: str) -> None:
    """The image's HEALTHCHECK asks /healthz with python (no curl in slim) on its own port."""
    instructions = dockerfile(name)
    checks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0]
    assert "urllib" in checks[0]
    assert "curl" not in checks[0]
    port_var = f"LONGHAUL_{APP_SERVICES[name][1].upper()}"
    assert port_var in checks[0]
    assert port_var in dockerfile_env(instructions)


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_dockerfile_cmd_is_an_existing_module(name: str) -> None:
    command = container_command(name)
    assert command == ["python", "-m", f"services.{name}"]
    assert importlib.util.find_spec(f"services.{name}") is not None
    # `python -m <package>` needs the package's __main__.
    assert importlib.util.find_spec(f"services.{name}.__main__") is not None


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_dockerfile_env_vars_are_settings_fields(name: str) -> None:
    known = env_names(settings_class(name))
    used = {k for k in dockerfile_env(dockerfile(name)) if k.startswith("LONGHAUL_")}
    assert used <= known, f"not settings fields: {sorted(used - known)}"


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_dockerfile_installs_dependencies_before_copying_source(name: str) -> None:
    """Editing code must not invalidate the dependency layer; COPY sources must exist."""
    instructions = dockerfile(name)
    base = [args for keyword, args in instructions if keyword == "FROM"]
    assert base == ["python:3.12-slim"]
    copies = [(i, args.split()) for i, (kw, args) in enumerate(instructions) if kw == "COPY"]
    first_install = next(
        i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "pip install" in args
    )
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for index, words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") not in ignored, f"COPY {source}: in .dockerignore"
            if source.startswith(("shared", "services")):
                assert index > first_install, f"COPY {source} comes before the dependencies"
    assert copies[0][1][0] == "pyproject.toml"


def test_dockerignore_keeps_secrets_and_venv_out_of_the_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".run", ".git"} <= set(ignored)


# --- Makefile, .ci/run, scripts --------------------------------------------------------

CONTRACT_TARGETS = {
    "install",
    "services",
    "migrate",
    "up",
    "test",
    "lint",
    "bench",
    "bench-quick",
    "clean",
}


def test_makefile_has_the_contract_targets() -> None:
    text = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.MULTILINE))
    assert defined >= CONTRACT_TARGETS
    phony = re.search(r"^\.PHONY:(.*)$", text, flags=re.MULTILINE)
    assert phony
    assert set(phony[1].split()) >= CONTRACT_TARGETS


def test_make_test_runs_services_lint_and_pytest() -> None:
    """`make -n test` (prints, runs nothing): the steps of the contract's `make test`."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    steps = [
        "chromium",
        "ruff check",
        "ruff format --check",
        "mypy",
        "ensure-services.sh --test",
        "missing_for_private_servers",
        "pytest -p no:cacheprovider",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions, out
    assert positions == sorted(positions), out
    assert "--junitxml=test-artifacts/" in out


@pytest.mark.parametrize(("pytest_rc", "make_ok"), [(0, True), (1, False), (5, False)])
def test_make_test_fails_when_pytest_collects_nothing(
    tmp_path: Path, pytest_rc: int, make_ok: bool
) -> None:
    """pytest's exit 5 (no tests) fails `make test`, like any other failure."""
    fake = tmp_path / "venv" / "bin" / "pytest"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!/bin/sh\nexit {pytest_rc}\n")
    fake.chmod(0o755)
    # -o: treat the slow prerequisites as done; only the pytest step runs.
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            "install",
            "-o",
            "test-servers",
            "-o",
            "chromium",
            "-o",
            "lint",
            "test",
            f"VENV={fake.parent.parent}",
            f"ARTIFACTS={tmp_path / 'art'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode == 0) is make_ok, result.stdout + result.stderr
    if pytest_rc == 5:
        assert "collected no tests" in result.stderr


def test_ci_run_calls_make_test() -> None:
    path = ROOT / ".ci" / "run"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert re.search(r"^(exec )?make test$", text, flags=re.MULTILINE)
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_ensure_services_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "ensure-services.sh")], check=True)


@pytest.mark.parametrize("database_path", ["run's", "none"])
async def test_ensure_services_is_quick_when_everything_is_up(
    deployment: Any, database_path: str
) -> None:
    """With the run's RabbitMQ, Redis and PostgreSQL up, it only checks, and says so;
    a database URL without a path (a valid one) too."""
    env = deployment.env()
    if database_path == "none":
        env["LONGHAUL_DATABASE_URL"] = env["LONGHAUL_DATABASE_URL"].rsplit("/", 1)[0]
    returncode, stderr = await _ensure_services(env)
    assert returncode == 0, stderr
    assert "are reachable" in stderr


@pytest.mark.parametrize("target", ["bench", "bench-quick"])
def test_make_bench_checks_the_benchmarks_own_services(target: str) -> None:
    """`make -n` (prints, runs nothing): the check is of the addresses the benchmark
    uses (LONGHAUL_BENCH_*_URL), before the benchmark."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    check = out.find("ensure-services.sh --bench")
    assert -1 < check < out.find("-m bench"), out


@pytest.mark.parametrize(("flag", "prefix"), [("--bench", "BENCH"), ("--test", "TEST")])
async def test_ensure_services_for_the_bench_and_the_tests_checks_their_urls(
    deployment: Any, flag: str, prefix: str
) -> None:
    """The services' URLs all answer; the benchmark's (or the tests') Redis does not
    (127.0.0.2 counts as another machine: it is only checked, and refuses at once)."""
    env = {
        **deployment.env(),
        f"LONGHAUL_{prefix}_AMQP_URL": deployment.amqp_url,
        f"LONGHAUL_{prefix}_REDIS_URL": "redis://127.0.0.2:1/0",
        f"LONGHAUL_{prefix}_PG_URL": deployment.database_url,
    }
    returncode, stderr = await _ensure_services(env, flag)
    assert returncode == 1, stderr
    assert "missing: Redis (127.0.0.2:1 is not reachable" in stderr


async def _ensure_services(
    env: dict[str, str], *args: str, base: Mapping[str, str] = os.environ
) -> tuple[int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(ROOT / "scripts" / "ensure-services.sh"),
        *args,
        env={**base, **env},
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout(10))
    return proc.returncode, stderr.decode()


@pytest.mark.parametrize(
    ("setting", "url", "socket_path"),
    [
        ("LONGHAUL_REDIS_URL", "unix:///nonexistent/redis.sock?db=0", "/nonexistent/redis.sock"),
        (
            "LONGHAUL_REDIS_URL",
            "unix://:secret@/nonexistent/redis%20a.sock",
            "/nonexistent/redis a.sock",
        ),
        (
            "LONGHAUL_DATABASE_URL",
            "postgresql://postgres@/longhaul?sslmode=disable&host=/nonexistent",
            "/nonexistent/.s.PGSQL.5432",
        ),
        (
            "LONGHAUL_DATABASE_URL",
            "postgresql://postgres@%2Fnonexistent:5433/longhaul",
            "/nonexistent/.s.PGSQL.5433",
        ),
        (
            "LONGHAUL_DATABASE_URL",
            "postgresql://postgres@/longhaul?host=%2Fnonexistent&port=5434",
            "/nonexistent/.s.PGSQL.5434",
        ),
        # printf's %b read the path's "\c" as the end of its output: /nonexistent/a.
        ("LONGHAUL_REDIS_URL", "unix:///nonexistent/a\\cb.sock", "/nonexistent/a\\cb.sock"),
    ],
)
async def test_ensure_services_checks_a_unix_socket_on_the_socket(
    deployment: Any, setting: str, url: str, socket_path: str
) -> None:
    """It checked TCP on the default port instead, where a server answered."""
    code, stderr = await _ensure_services({**deployment.env(), setting: url})
    assert code == 1, stderr
    assert f"nothing listens on the Unix socket {socket_path};" in stderr


@pytest.mark.parametrize(
    ("url", "pg_env", "problem"),
    [
        # It checked 127.0.0.1:5432, where a server answered, and then blamed the login.
        (
            "postgresql://postgres@/longhaul",
            {"PGHOST": "/nonexistent"},
            "nothing listens on the Unix socket /nonexistent/.s.PGSQL.5432;",
        ),
        (
            "postgresql://postgres@:5499/longhaul",
            {},
            "nothing listens on 127.0.0.1:5499 or a socket in /run/postgresql"
            " /var/run/postgresql /tmp /private/tmp;",
        ),
        (
            "postgresql://postgres@127.0.0.1/longhaul",
            {"PGPORT": "5498"},
            "nothing listens on 127.0.0.1:5498;",
        ),
    ],
)
async def test_ensure_services_looks_for_a_postgresql_url_without_host_where_asyncpg_does(
    deployment: Any, url: str, pg_env: dict[str, str], problem: str
) -> None:
    """The URL's host and port, else PGHOST and PGPORT, else asyncpg's defaults."""
    base = {k: v for k, v in os.environ.items() if k not in {"PGHOST", "PGPORT"}}
    env = {**deployment.env(), "LONGHAUL_DATABASE_URL": url, **pg_env}
    code, stderr = await _ensure_services(env, base=base)
    assert code == 1, stderr
    assert problem in stderr


async def test_ensure_services_reaches_servers_on_their_unix_sockets(
    deployment: Any, tmp_path: Path
) -> None:
    """A private Redis on a socket only; PostgreSQL on its socket when this machine's
    cluster has one (the login is checked over it too)."""
    sock = tmp_path / "redis.sock"
    server = await asyncio.create_subprocess_exec(
        "redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "",
        "--appendonly", "no", "--dir", str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip

    async def listening() -> bool:
        return sock.is_socket()

    try:
        await eventually(listening, what="redis-server's socket")
        env = {**deployment.env(), "LONGHAUL_REDIS_URL": f"unix://{sock}?db=0"}
        pg_dir = Path("/var/run/postgresql")
        if (pg_dir / ".s.PGSQL.5432").is_socket():
            env["LONGHAUL_DATABASE_URL"] = f"postgresql://postgres@/longhaul?host={pg_dir}"
        code, stderr = await _ensure_services(env)
        assert code == 0, stderr
    finally:
        server.kill()
        await server.wait()


# --- each image's command, on the host -------------------------------------------------


async def http_status(url: str) -> int | None:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(APP_SERVICES))
async def test_container_command_serves_healthz_and_stops_cleanly(
    deployment: Any, ports: dict[str, str], name: str
) -> None:
    """The image's CMD, run on the host: /healthz answers 200, SIGTERM exits 0."""
    command = container_command(name)
    module = command[2]
    url = f"http://127.0.0.1:{ports[APP_SERVICES[name][1]]}/healthz"
    with running(module, deployment.env(**ports), args=command[3:]) as proc:

        async def healthz() -> bool:
            assert proc.alive(), f"{name} exited:\n{proc.output()[-3000:]}"
            return await http_status(url) == 200

        await eventually(healthz, within=60, what=f"{name} /healthz")
        code = proc.terminate()
        assert code == 0, f"{name} exited {code} on SIGTERM:\n{proc.output()[-3000:]}"


# --- scripts/up.py (`make up`) ---------------------------------------------------------


def load_up_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("longhaul_up", ROOT / "scripts" / "up.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class UpProcess:
    """scripts/up.py as `make up` runs it, its output kept as an artifact."""

    def __init__(self, env: dict[str, str], state_dir: Path, name: str) -> None:
        (ARTIFACTS / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / "logs" / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "up.py"), "--state-dir", str(state_dir)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def child(self, module: str) -> int:
        return next(
            pid for pid in self.children() if module in Path(f"/proc/{pid}/cmdline").read_text()
        )

    async def wait_up(self) -> str:
        """The dev key, once up.py says everything is up."""

        async def printed_key() -> str | None:
            assert self.proc.poll() is None, f"up.py exited:\n{self.output()[-3000:]}"
            match = re.search(r"#key=(\S+)", self.output())
            return match[1] if match else None

        return await eventually(printed_key, within=90, what="up.py's console URL")

    async def wait(self, within: float = 90) -> int:
        """Its exit code; killed if it takes longer than ``within`` (scaled)."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout(within))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await self.wait()


def still_running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.mark.e2e
async def test_up_runs_the_system_with_a_dev_key_and_stops_on_sigterm(
    deployment: Any, ports: dict[str, str], tmp_path: Path
) -> None:
    """`make up`: all three answer, the printed key works, SIGTERM drains them and exits 0."""
    env = deployment.env(**ports)
    up = UpProcess(env, tmp_path, "up-sigterm")
    try:
        key = await up.wait_up()
        assert f"http://127.0.0.1:{ports['api_port']}/#key={key}" in up.output()
        assert (tmp_path / "dev-api-key").read_text().strip() == key
        assert (tmp_path / "dev-api-key").stat().st_mode & 0o077 == 0
        children = up.children()
        assert len(children) == 3
        for port in ports.values():
            assert await http_status(f"http://127.0.0.1:{port}/healthz") == 200
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{ports['api_port']}/v1/tasks",
                headers={"Authorization": f"Bearer {key}"},
            ) as response,
        ):
            assert response.status == 200
        up.proc.send_signal(signal.SIGTERM)
        assert await up.wait() == 0, up.output()[-3000:]
        # up.py waited for its children: none is left running (or unreaped).
        assert not still_running(children)
    finally:
        await up.stop()

    # A second `make up` reuses the stored key; an unknown stored key is replaced.
    up_module = load_up_module()
    settings = CommonSettings(database_url=deployment.database_url)
    # dev_key runs its own event loop, as it does in up.py: keep it off this test's loop.
    assert await asyncio.to_thread(up_module.dev_key, settings, tmp_path) == key
    (tmp_path / "dev-api-key").write_text("lh_dev_aaaaaaaaaaaa_" + "a" * 43 + "\n")
    renewed = await asyncio.to_thread(up_module.dev_key, settings, tmp_path)
    assert renewed != key
    assert (tmp_path / "dev-api-key").read_text().strip() == renewed
    # LONGHAUL_DEV_API_KEY: that key, registered the first time, as it is afterwards;
    # the stored one is left alone. Not a key: one line, before anything starts.
    given = keys.generate("dev").key
    for _ in range(2):
        assert await asyncio.to_thread(up_module.dev_key, settings, tmp_path, given) == given
        assert await up_module._key_is_valid(deployment.database_url, given, timeout(10))
    assert await asyncio.to_thread(up_module.dev_key, settings, tmp_path) == renewed
    with pytest.raises(up_module.UpError, match="LONGHAUL_DEV_API_KEY is not a Longhaul"):
        await asyncio.to_thread(up_module.dev_key, settings, tmp_path, "lh_dev_oops")


@pytest.mark.e2e
async def test_up_stops_everything_when_a_child_dies(
    deployment: Any, ports: dict[str, str], tmp_path: Path
) -> None:
    """If one service dies, up.py stops the others and exits non-zero naming it."""
    up = UpProcess(deployment.env(**ports), tmp_path, "up-child-dies")
    try:
        await up.wait_up()
        os.kill(up.child("services.worker"), signal.SIGKILL)
        assert await up.wait() == 1
        assert "worker exited unexpectedly (signal SIGKILL)" in up.output()
        for port in (ports["api_port"], ports["gateway_port"]):
            assert await http_status(f"http://127.0.0.1:{port}/healthz") is None
    finally:
        await up.stop()


@pytest.mark.e2e
async def test_up_refuses_a_port_another_server_holds(
    deployment: Any, ports: dict[str, str], tmp_path: Path
) -> None:
    """Another server on the gateway's port would answer the health check, and `make up`
    announced it as its own: it stops first, naming the port, and starts nothing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(ports["gateway_port"])))
        taken.listen()
        up = UpProcess(deployment.env(**ports), tmp_path, "up-port-taken")
        code = await up.wait(within=30)
    assert code == 1
    assert f"ws_gateway: 127.0.0.1:{ports['gateway_port']} is taken" in up.output()
    assert "Longhaul is up" not in up.output()
    assert not (tmp_path / "dev-api-key").exists()  # nothing was started or made
