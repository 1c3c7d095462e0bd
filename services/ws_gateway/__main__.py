"""``python -m services.ws_gateway``: one gateway process."""

from __future__ import annotations

import sys

from services.ws_gateway.app import Gateway
from services.ws_gateway.settings import GatewaySettings
from shared.lifecycle import Stop, run
from shared.logging import setup_logging
from shared.settings import load


async def main(stop: Stop) -> None:
    settings = load(GatewaySettings)
    setup_logging("ws_gateway", settings.log_level, settings.log_format)
    async with Gateway(settings).start(stop):
        await stop.wait()


if __name__ == "__main__":
    sys.exit(run("ws_gateway", main))
