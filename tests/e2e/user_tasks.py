"""A user's own task module, loaded by the worker with ``--tasks tests.e2e.user_tasks``."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from services.worker.sdk import TaskContext, task


class ReverseArgs(BaseModel):
    text: str = Field(max_length=1000)


class ReverseResult(BaseModel):
    reversed: str
    attempt: int


@task("user.reverse", max_attempts=2)
async def reverse(ctx: TaskContext, args: ReverseArgs) -> ReverseResult:
    """Reverses a string, reporting progress once, and returns a pydantic model."""
    await ctx.report_progress(0.5, "halfway", data={"length": len(args.text)})
    return ReverseResult(reversed=args.text[::-1], attempt=ctx.attempt)


class NapArgs(BaseModel):
    seconds: float = Field(ge=0, le=60)


@task("user.strict", max_attempts=1, timeout_s=0.3)
async def strict(ctx: TaskContext, args: NapArgs) -> dict[str, float]:
    """Sleeps; past its type's timeout unless the request sets a longer one."""
    await asyncio.sleep(args.seconds)
    return {"slept": args.seconds}
