"""API keys: ``lh_<label>_<key_id>_<secret>``. The key id (public, indexed) lets a user
and the server recognise a key; only a hash of the secret is stored and it is compared
in constant time. Pure: no I/O."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

_KEY_RE = re.compile(r"^lh_([a-z0-9]{1,16})_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# A key with its secret cut off, as listed: enough to name its key id.
_SHOWN_RE = re.compile(r"^lh_[a-z0-9]{1,16}_([a-z0-9]{12})_")


@dataclass(frozen=True)
class ParsedKey:
    label: str
    key_id: str
    secret: str


@dataclass(frozen=True)
class NewKey:
    key: str
    key_id: str
    label: str
    secret_hash: bytes


def hash_secret(secret: str) -> bytes:
    # The secret is 256 random bits: a plain SHA-256 cannot be brute-forced, and a
    # slow KDF would only slow down every request.
    return hashlib.sha256(secret.encode()).digest()


def generate(label: str = "live") -> NewKey:
    if not re.fullmatch(r"[a-z0-9]{1,16}", label):
        raise ValueError("label must be 1-16 lowercase letters or digits")
    key_id = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    return NewKey(
        key=f"lh_{label}_{key_id}_{secret}",
        key_id=key_id,
        label=label,
        secret_hash=hash_secret(secret),
    )


def parse(key: str) -> ParsedKey | None:
    match = _KEY_RE.match(key)
    if match is None:
        return None
    return ParsedKey(label=match[1], key_id=match[2], secret=match[3])


def key_id_of(text: str) -> str:
    """The key id ``text`` names: a whole key, a key as ``keys list`` shows it
    (``lh_<label>_<key id>_…``), or else the text itself, taken for a key id."""
    match = _SHOWN_RE.match(text)
    return match[1] if match else text


def verify(parsed: ParsedKey, secret_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(parsed.secret), secret_hash)


def redact(key: str) -> str:
    """What may be shown or logged of a key: its label and id, never the secret."""
    parsed = parse(key)
    return f"lh_{parsed.label}_{parsed.key_id}_…" if parsed else "lh_…"
