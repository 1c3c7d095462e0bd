"""Which ``Origin`` headers may open a connection. Pure: no I/O.

Browsers attach ``Origin`` to every WebSocket handshake; refusing foreign origins is the
defence against Cross-Site WebSocket Hijacking (a page elsewhere riding on a user's
credentials). Entries are exact origins or origins with ``*`` standing for one run of
host or port characters."""

from __future__ import annotations

import re

# What "*" may stand for: host labels and port digits, never "/", "@" or ":" that
# would let "http://localhost:*" match another host.
_WILD = "[A-Za-z0-9-]+"
_ENTRY_RE = re.compile(r"^(https?)://[A-Za-z0-9.*\-\[\]:]+$")


def parse_allowed_origins(value: str) -> tuple[re.Pattern[str], ...]:
    """Compile a comma-separated allow-list; raise ValueError naming a malformed entry."""
    patterns = []
    for raw in value.split(","):
        entry = raw.strip().rstrip("/")
        if not entry:
            continue
        if not _ENTRY_RE.match(entry):
            raise ValueError(f"not an origin: {entry!r} (want scheme://host[:port])")
        regex = "".join(
            _WILD if part == "*" else re.escape(part) for part in re.split(r"(\*)", entry.lower())
        )
        # Case-insensitive (scheme and host are): websockets' own check of the raw
        # header uses these patterns too, and must take what ours takes.
        patterns.append(re.compile(f"^{regex}$", re.IGNORECASE))
    return tuple(patterns)


def origin_allowed(
    origin: str | None, allowed: tuple[re.Pattern[str], ...], *, allow_missing: bool
) -> bool:
    if origin is None:
        return allow_missing
    candidate = origin.strip()
    return any(p.match(candidate) for p in allowed)
