"""The contract's built-in task types, written with the same SDK users use."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from services.worker.sdk import EmptyArgs, PermanentError, RetryableError, TaskContext, task


@task("demo.noop")
async def noop(ctx: TaskContext, args: EmptyArgs) -> dict[str, bool]:
    """Returns at once; the benchmark's unit of work."""
    return {"ok": True}


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(default=5.0, ge=0, le=24 * 3600)
    steps: int = Field(default=10, ge=1, le=100_000)


@task("demo.sleep")
async def sleep(ctx: TaskContext, args: SleepArgs) -> dict[str, float]:
    """Sleeps ``seconds`` in ``steps`` equal steps, reporting progress after each."""
    for step in range(1, args.steps + 1):
        await asyncio.sleep(args.seconds / args.steps)
        await ctx.report_progress(step / args.steps, f"step {step} of {args.steps}")
    return {"slept": args.seconds}


class FlakyArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_times: int = Field(default=1, ge=0, le=100)


@task("demo.flaky")
async def flaky(ctx: TaskContext, args: FlakyArgs) -> dict[str, int]:
    """Fails (retryably) on its first ``fail_times`` attempts, then succeeds."""
    if ctx.attempt <= args.fail_times:
        raise RetryableError(
            f"attempt {ctx.attempt} of {args.fail_times} planned failures", type="flaky"
        )
    return {"attempts": ctx.attempt}


class FailArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(default="demo.fail always fails", max_length=10_000)


@task("demo.fail")
async def fail(ctx: TaskContext, args: FailArgs) -> None:
    """Fails at once, for good."""
    raise PermanentError(args.message, type="demo_failure")
