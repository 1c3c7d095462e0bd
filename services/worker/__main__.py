"""``python -m services.worker [--tasks my.module ...]``: one worker process."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services import envnames
from services.worker.app import run_worker
from services.worker.registry import Registry
from services.worker.settings import WorkerSettings
from shared.errors import ConfigError
from shared.lifecycle import EXIT_CONFIG, Stop, run
from shared.logging import setup_logging
from shared.settings import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.worker")
    parser.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="MODULE",
        help="import @task handlers from this module (repeatable)",
    )
    args = parser.parse_args(argv)
    # Configuration is checked before anything connects anywhere.
    try:
        settings = load(WorkerSettings)
        setup_logging("worker", settings.log_level, settings.log_format)
        for warning in [*settings.warnings(), envnames.warning(os.environ)]:
            if warning is not None:
                logging.getLogger("services.worker").warning(warning)
        registry = Registry.load(args.tasks)
    except ConfigError as exc:
        sys.stderr.write(f"worker: {exc}\n")
        return EXIT_CONFIG

    async def main_(stop: Stop) -> None:
        await run_worker(settings, registry, stop)

    return run("worker", main_, drain_s=settings.drain_bound_s)


if __name__ == "__main__":
    sys.exit(main())
