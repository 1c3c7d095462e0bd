"""Task types of the abuse tests, loaded with ``--tasks tests.abuse.abuse_tasks``: an echo
whose args and result carry a marker string, so a leak of either can be searched for."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.worker.sdk import PermanentError, TaskContext, task


class EchoArgs(BaseModel):
    marker: str = Field(max_length=200)
    fail: bool = False


@task("abuse.echo", max_attempts=1)
async def echo(ctx: TaskContext, args: EchoArgs) -> dict[str, str]:
    """Returns the marker reversed (so the result is its own searchable string)."""
    await ctx.report_progress(0.5, f"echoing {args.marker}", data={"marker": args.marker})
    if args.fail:
        raise PermanentError(f"failed on purpose: {args.marker}", type="abuse_failure")
    return {"echo": args.marker[::-1]}
