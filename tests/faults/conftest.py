"""Fixtures of the fault suite, and the table it prints at the end of the session
(also written to ``test-artifacts/faults.json``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import Deployment, Tenant
from tests.faults.harness import FaultResult, FaultRun
from tests.faults.ledger_tasks import LEDGER_DDL
from tests.support import ARTIFACTS, free_port

RESULTS = pytest.StashKey[list[FaultResult]]()
COLUMNS = ("fault", "tasks", "lost", "duplicates", "redeliveries", "recover_s")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS, [])
    if not results:
        return
    rows = [
        [str(getattr(r, c)) if getattr(r, c) is not None else "-" for c in COLUMNS] for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    terminalreporter.section("fault injection")
    terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        terminalreporter.write_line("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for r in results:
        if r.extra or r.notes:
            terminalreporter.write_line(f"{r.fault}: {r.notes} {json.dumps(r.extra, default=str)}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "faults.json").write_text(
        json.dumps([r.as_dict() for r in results], indent=2, default=str)
    )


@pytest.fixture(scope="session")
async def ledger_db(db: asyncpg.Pool) -> asyncpg.Pool:
    await db.execute(LEDGER_DDL)
    return db


def new_ports() -> dict[str, str]:
    return {
        "api_port": str(free_port()),
        "gateway_port": str(free_port()),
        "worker_metrics_port": str(free_port()),
    }


MakeRun = Callable[..., FaultRun]


@pytest.fixture
async def make_run(
    request: pytest.FixtureRequest,
    deployment: Deployment,
    tenant: Tenant,
    ledger_db: asyncpg.Pool,
    http: aiohttp.ClientSession,
) -> AsyncIterator[MakeRun]:
    """Build a FaultRun against the run's deployment, or against private instances
    (``env``/``pool``/``api_key``/``redis_url``/``namespace`` overrides). Every run's
    processes are stopped at teardown and its verdict goes into the summary table."""
    runs: list[FaultRun] = []

    def make(
        *,
        env: dict[str, str] | None = None,
        pool: asyncpg.Pool | None = None,
        api_key: str | None = None,
        redis_url: str | None = None,
        namespace: str | None = None,
    ) -> FaultRun:
        run = FaultRun(
            env={**deployment.env(), **(env or {})},
            ports=new_ports(),
            api_key=api_key or tenant.key,
            pool=pool or ledger_db,
            redis_url=redis_url or deployment.redis_url,
            namespace=namespace or deployment.namespace,
            http=http,
        )
        runs.append(run)
        return run

    try:
        yield make
    finally:
        for run in runs:
            run.system.stop()
            if (result := getattr(run, "result", None)) is not None:
                request.config.stash[RESULTS].append(result)
