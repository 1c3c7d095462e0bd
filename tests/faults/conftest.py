"""Fixtures of the fault suite; each run's verdict goes to the table of ``report.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import asyncpg
import pytest

from tests.conftest import Deployment, Tenant
from tests.faults.harness import FaultRun
from tests.faults.ledger_tasks import LEDGER_DDL
from tests.faults.report import record
from tests.support import free_port


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
                record(request.config, result)
