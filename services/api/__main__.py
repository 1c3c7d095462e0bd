"""``python -m services.api``: one API process."""

from __future__ import annotations

import logging
import os
import sys

from services import envnames
from services.api.app import serve
from services.api.settings import ApiSettings
from shared.errors import ConfigError
from shared.lifecycle import EXIT_CONFIG, Stop, run
from shared.logging import setup_logging
from shared.settings import load


def main() -> int:
    try:
        settings = load(ApiSettings)
    except ConfigError as exc:
        sys.stderr.write(f"api: {exc}\n")
        return EXIT_CONFIG
    setup_logging("api", settings.log_level, settings.log_format)
    for warning in [*settings.warnings(), envnames.warning(os.environ)]:
        if warning is not None:
            logging.getLogger("services.api").warning(warning)

    async def main_(stop: Stop) -> None:
        await serve(settings, stop)

    return run("api", main_, drain_s=settings.drain_bound_s)


if __name__ == "__main__":
    sys.exit(main())
