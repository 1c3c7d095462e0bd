"""Settings every service reads from ``LONGHAUL_*`` env vars, built once in ``main``."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError
from shared.failpoints import Failpoints

_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Any duration setting (a name ending in _s): past this, a value is a typo, and some
# overflow at run time (an interval out of PostgreSQL's range, an expiry Redis refuses).
MAX_SECONDS = 10 * 365 * 24 * 3600
# Room to spare in a service's drain bound (drain_bound_s) beyond the sum of its steps'.
DRAIN_SPARE_S = 10.0
# A step of a drain that talks to a dependency: the wait for a pooled connection and the
# statement's timeout (its own and a second), each up to LONGHAUL_IO_TIMEOUT_S.
DRAIN_STEP_TIMEOUTS = 2
_SCHEMES = {
    "amqp_url": ("amqp", "amqps"),
    "redis_url": ("redis", "rediss", "unix"),
    "database_url": ("postgresql", "postgres"),
}

PositiveFloat = Annotated[float, Field(gt=0)]
S = TypeVar("S", bound=BaseSettings)


class CommonSettings(BaseSettings):
    """Connection settings and the namespace that isolates one deployment (or test run)."""

    model_config = SettingsConfigDict(
        env_prefix="LONGHAUL_", extra="ignore", frozen=True, allow_inf_nan=False
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/longhaul"
    # Prefix of every queue, exchange, Redis key and NOTIFY channel: lets several
    # deployments or test runs share one broker, Redis and PostgreSQL server.
    namespace: str = "longhaul"
    # How long a starting service waits for a dependency before exiting non-zero.
    start_timeout_s: PositiveFloat = 30.0
    # Every outbound call (SQL, Redis, publish) is bounded by this.
    io_timeout_s: PositiveFloat = 5.0
    # How soon /readyz answers: a dependency that has not answered its check by then is
    # reported down. Under a probe's own timeout (Kubernetes' default: 1 s).
    ready_timeout_s: PositiveFloat = 0.5
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|text)$")
    # Test-only fault injection, "name=action,name=action" (see shared.failpoints).
    failpoints: str = ""
    # Where the API listens; known to every service, since the gateway admits browsers
    # from its origin (the console).
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    # Where the gateway listens; known to every service, since the API tells browsers
    # where to reach it.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8001, ge=0, le=65535)
    # Where browsers reach the gateway; shown in Task.links.events. Unset, where the
    # gateway listens (see _public_ws_url_follows_the_gateway).
    public_ws_url: str = Field(default="", validate_default=True)
    # Retention of per-task progress streams in Redis.
    event_retention_s: PositiveFloat = 24 * 3600
    event_stream_maxlen: int = Field(default=10_000, ge=10)
    # A running task's lease; a worker renews it every third of this.
    lease_s: PositiveFloat = 30.0
    # Quorum-queue delivery limit: crash loops past it are dead-lettered. Kept well
    # above any max_attempts since every unacked delivery of a killed worker counts.
    delivery_limit: int = Field(default=50, ge=2)
    # Broker-side last guard against floods (x-max-length + reject-publish).
    queue_max_length: int = Field(default=1_000_000, ge=1)

    @field_validator("public_ws_url")
    @classmethod
    def _public_ws_url_follows_the_gateway(cls, value: str, info: ValidationInfo) -> str:
        # LONGHAUL_GATEWAY_HOST/PORT move the gateway: a deployment that sets them for
        # every service points browsers there without also setting the URL. From their
        # validated values (declared above this field): " 9000 " is port 9000.
        if value:
            # Browsers connect to it and the console's Content-Security-Policy names its
            # origin: anything but a plain ws(s) URL would fail there, far from its cause.
            parts = urlsplit(value)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise ValueError("must be a ws:// or wss:// URL with a host")
            if parts.username is not None or parts.fragment:
                raise ValueError("must not hold credentials or a #fragment")
            return value
        return (
            url_of("ws", info.data.get("gateway_host"), info.data.get("gateway_port"), 8001)
            + "/v1/ws"
        )

    @field_validator("amqp_url", "redis_url", "database_url")
    @classmethod
    def _url_of_its_kind(cls, value: str, info: ValidationInfo) -> str:
        schemes = _SCHEMES[str(info.field_name)]
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
            raise ValueError(f"must be a URL starting {' or '.join(s + '://' for s in schemes)}")
        database = parts.path.removeprefix("/")
        if parts.scheme in ("redis", "rediss") and database and not database.isdecimal():
            # redis-py would take database 0 in its place, without a word.
            raise ValueError(f"the database (the path) must be a number, not {database!r}")
        return value

    @field_validator("failpoints")
    @classmethod
    def _failpoints_parse(cls, value: str) -> str:
        Failpoints(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("*")
    @classmethod
    def _durations_in_range(cls, value: Any, info: ValidationInfo) -> Any:
        name = str(info.field_name)
        if name.endswith("_s") and isinstance(value, float | int) and value > MAX_SECONDS:
            raise ValueError(f"must be at most {MAX_SECONDS} seconds")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace_is_a_name(cls, value: str) -> str:
        if not _NAMESPACE_RE.match(value):
            raise ValueError("must match [a-z][a-z0-9_]{0,39}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return upper


def reachable_host(host: str) -> str:
    """Where a server bound to ``host`` is reached from this machine (one bound to
    ``::`` listens on IPv6 alone: asyncio sets IPV6_V6ONLY)."""
    if host == "::":
        return "::1"
    return "127.0.0.1" if host in {"", "0.0.0.0"} else host


def url_of(scheme: str, host: object, port: object, default_port: int) -> str:
    """``scheme://host:port`` of a server bound to ``host`` (validated settings; missing
    where their own validation failed), reached from this machine; the port left out
    where it is the scheme's own, as a browser's Origin leaves it."""
    where = reachable_host(str(host if host is not None else "127.0.0.1"))
    where = f"[{where}]" if ":" in where else where  # an IPv6 address in a URL
    number = port if isinstance(port, int) else default_port
    own = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(scheme)
    return f"{scheme}://{where}" if number == own else f"{scheme}://{where}:{number}"


def load(cls: type[S]) -> S:
    """Build settings from the environment, or raise ConfigError with one readable line."""
    try:
        return cls()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "?"
        env = f"LONGHAUL_{field.upper()}"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"invalid configuration: {env}: {first['msg']}{more}") from None
