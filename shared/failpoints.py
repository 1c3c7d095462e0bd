"""Named failpoints for fault-injection tests, configured by ``LONGHAUL_FAILPOINTS``.

``"relay.after_confirm=crash,worker.after_commit=crash"``: at ``relay.after_confirm`` the
process dies as if by ``kill -9``; ``hang`` waits forever, ``pause`` half a second (to
let another process win a race), ``raise`` raises InjectedFault (a bug: an exception
nothing expects). Production leaves the setting empty, and then ``hit()`` is a dict
lookup."""

from __future__ import annotations

import asyncio
import os
import sys

ACTIONS = frozenset({"crash", "hang", "pause", "raise"})
PAUSE_S = 0.5


class InjectedFault(Exception):
    """Raised by a ``raise`` failpoint."""


class Failpoints:
    def __init__(self, spec: str) -> None:
        self._points: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, action = item.partition("=")
            if action not in ACTIONS:
                raise ValueError(f"failpoint {name!r}: action must be one of {sorted(ACTIONS)}")
            self._points[name] = action

    async def hit(self, name: str) -> None:
        action = self._points.get(name)
        if action == "crash":
            sys.stderr.write(f"failpoint {name}: crashing\n")
            sys.stderr.flush()
            os._exit(137)
        if action == "hang":
            await asyncio.Event().wait()
        if action == "pause":
            await asyncio.sleep(PAUSE_S)
        if action == "raise":
            raise InjectedFault(f"failpoint {name}")
