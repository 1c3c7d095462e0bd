"""End-to-end fixtures: the real services as processes, an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import Deployment
from tests.support import System


@pytest.fixture
async def system(deployment: Deployment, ports: dict[str, str]) -> AsyncIterator[System]:
    sys_ = System(deployment.env(), ports)
    try:
        yield sys_
    finally:
        sys_.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session
