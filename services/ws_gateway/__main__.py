"""``python -m services.ws_gateway``: one gateway process."""

from __future__ import annotations

import logging
import os
import sys

from services import envnames
from services.ws_gateway.app import Gateway
from services.ws_gateway.settings import GatewaySettings
from shared.errors import ConfigError
from shared.lifecycle import EXIT_CONFIG, Stop, run, stop_delay
from shared.logging import setup_logging
from shared.settings import load


def main() -> int:
    try:
        settings = load(GatewaySettings)
    except ConfigError as exc:
        sys.stderr.write(f"ws_gateway: {exc}\n")
        return EXIT_CONFIG
    setup_logging("ws_gateway", settings.log_level, settings.log_format)
    if (unknown := envnames.warning(os.environ)) is not None:
        logging.getLogger("services.ws_gateway").warning(unknown)

    async def serve(stop: Stop) -> None:
        async with Gateway(settings).start(stop):
            await stop.wait()
            # Still serving, new clients too; /readyz answers 503 from the stop on.
            await stop_delay(stop, settings.stop_delay_s, "ws_gateway")

    return run("ws_gateway", serve, drain_s=settings.drain_bound_s)


if __name__ == "__main__":
    sys.exit(main())
