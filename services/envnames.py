"""``LONGHAUL_*`` names that no Longhaul setting reads. pydantic-settings ignores them,
so a typo (``LONGHAUL_WORKER_CONCURENCY``) would leave the default in place without a
word; each service logs them at start instead. Not refused: a name of a later version
(during a roll-back) must not stop a process.

One list for every service, as deployments give all of them one environment: a
worker's setting is no typo in the API's."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from services.api.settings import ApiSettings
from services.worker.settings import WorkerSettings
from services.ws_gateway.settings import GatewaySettings

_PREFIX = "LONGHAUL_"
# Read by what is around the services: make, the test suite and the benchmark.
_TOOLS = frozenset({"LONGHAUL_DEV_API_KEY", "LONGHAUL_PYTHON", "LONGHAUL_FUZZ_SEED"})
_TOOL_PREFIXES = ("LONGHAUL_TEST_", "LONGHAUL_BENCH_")

KNOWN: frozenset[str] = frozenset(
    _PREFIX + field.upper()
    for cls in (ApiSettings, WorkerSettings, GatewaySettings)
    for field in cls.model_fields
)


def unknown_names(environ: Mapping[str, str]) -> list[str]:
    """Each ``LONGHAUL_*`` name of ``environ`` no setting reads, with the closest known
    name where one is close: ``"LONGHAUL_X (LONGHAUL_Y?)"``. Pure."""
    out = []
    for name in sorted(environ):
        # pydantic-settings reads names in any case: so is a typo looked for.
        upper = name.upper()
        if not upper.startswith(_PREFIX) or upper in KNOWN or upper in _TOOLS:
            continue
        if upper.startswith(_TOOL_PREFIXES):
            continue
        close = difflib.get_close_matches(upper, KNOWN, n=1, cutoff=0.8)
        out.append(f"{name} ({close[0]}?)" if close else name)
    return out


def warning(environ: Mapping[str, str]) -> str | None:
    """The start-up warning for ``environ``'s unknown names, or None."""
    names = unknown_names(environ)
    if not names:
        return None
    return f"no setting reads {', '.join(names)}: a typo? (their defaults apply)"
