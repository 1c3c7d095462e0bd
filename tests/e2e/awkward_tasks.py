"""Handlers that do what a handler should not, loaded with
``--tasks tests.e2e.awkward_tasks``: each must cost its own attempt, not the worker,
nor another task's outcome."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.worker.sdk import TaskContext, task


class ValueArgs(BaseModel):
    value: Any = None


@task("awkward.echo", max_attempts=1)
async def echo(ctx: TaskContext, args: ValueArgs) -> Any:
    """Returns its argument: any JSON, arrays included."""
    return args.value


class Opaque(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: object


@task("awkward.opaque", max_attempts=1)
async def opaque(ctx: TaskContext, args: ValueArgs) -> Opaque:
    """Returns a model pydantic cannot serialize."""
    return Opaque(thing=object())


@task("awkward.reports", max_attempts=1)
async def reports(ctx: TaskContext, args: ValueArgs) -> dict[str, str]:
    """Reports faster than the rate limit, the last one with data that is not JSON,
    then a message with a lone surrogate; returns what report_progress raised."""
    await ctx.report_progress(0.1, "first")
    try:
        await ctx.report_progress(0.2, "held back", data={"set": {1, 2}})
    except TypeError as exc:
        refused = str(exc)
    else:
        refused = ""
    await ctx.report_progress(0.3, "lone \ud800 surrogate")
    return {"refused": refused}


class SecondsArgs(BaseModel):
    seconds: float = 8.0


@task("awkward.stubborn", max_attempts=1, timeout_s=60)
async def stubborn(ctx: TaskContext, args: SecondsArgs) -> str:
    """Ignores cancellation until ``seconds`` have passed."""
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            continue
    return "done"


@task("awkward.exit", max_attempts=1)
async def exits(ctx: TaskContext, args: ValueArgs) -> None:
    sys.exit(3)


@task("awkward.block", max_attempts=1, timeout_s=0.5)
async def block(ctx: TaskContext, args: SecondsArgs) -> str:
    """Blocks the event loop past its timeout, never yielding."""
    time.sleep(args.seconds)  # noqa: ASYNC251 - the point of this handler
    return "blocked"
