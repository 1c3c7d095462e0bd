"""Small helpers for asyncio futures whose outcome nobody may await."""

from __future__ import annotations

import asyncio
from typing import Any


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback: the future's exception counts as retrieved, so asyncio does not
    log "exception was never retrieved" for an outcome told elsewhere or no longer
    awaited."""
    if not future.cancelled():
        future.exception()
