"""End-to-end fixtures: the real services as processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import Deployment
from tests.support import System, register_task_types


@pytest.fixture(scope="session")
async def builtin_types(deployment: Deployment) -> None:
    """Tests that start an API alone submit built-in types (demo.noop): without this they
    passed only after a test that had started a worker."""
    await register_task_types(deployment.env())


@pytest.fixture
async def system(
    deployment: Deployment, ports: dict[str, str], builtin_types: None
) -> AsyncIterator[System]:
    sys_ = System(deployment.env(), ports)
    try:
        yield sys_
    finally:
        sys_.stop()
