"""Plain ``def`` handlers, loaded with ``--tasks tests.e2e.thread_tasks``: blocking code
run in the worker's own threads, reporting from them and told to stop through
``ctx.cancelled``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.worker.sdk import (
    EmptyArgs,
    PermanentError,
    SyncTaskContext,
    TaskContext,
    task,
)


class StepsArgs(BaseModel):
    steps: int = Field(default=3, ge=1, le=100)


@task("threads.report", max_attempts=1)
def report(ctx: SyncTaskContext, args: StepsArgs) -> dict[str, Any]:
    """Reports each step from its thread, with data, then data that is not JSON; returns
    its thread's name and what report_progress raised."""
    thread = threading.current_thread().name
    for step in range(1, args.steps + 1):
        ctx.report_progress(step / args.steps, f"step {step}", data={"step": step})
    try:
        ctx.report_progress(1.0, data={"set": {1, 2}})
    except TypeError as exc:
        refused = str(exc)
    else:
        refused = ""
    return {"thread": thread, "refused": refused}


@task("threads.refuse", max_attempts=3)
def refuse(ctx: SyncTaskContext, args: EmptyArgs) -> None:
    raise PermanentError("no such customer", type="no_customer")


class PathArgs(BaseModel):
    path: str


@task("threads.wait_for", max_attempts=1, timeout_s=120)
def wait_for(ctx: SyncTaskContext, args: PathArgs) -> str:
    """Blocks its thread until the file at ``path`` exists; returns the thread's name."""
    while not Path(args.path).exists() and not ctx.cancelled:
        time.sleep(0.01)
    return threading.current_thread().name


@task("threads.touch", max_attempts=1)
async def touch(ctx: TaskContext, args: PathArgs) -> None:
    """Makes the file ``threads.wait_for`` waits for: an async handler, on the loop."""
    Path(args.path).touch()  # noqa: ASYNC240 - one small file: blocks for microseconds


@task("threads.cooperative", max_attempts=1, timeout_s=600)
def cooperative(ctx: SyncTaskContext, args: PathArgs) -> str:
    """Waits for its stop, writes to ``path`` whether it was told, and returns."""
    told = ctx.cancelled.wait(120)
    Path(args.path).write_text("told" if told else "not told")
    return "stopped"
