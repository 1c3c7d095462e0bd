"""End-to-end fixtures: the real services as processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
