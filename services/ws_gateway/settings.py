"""Gateway settings (``LONGHAUL_*`` env vars) on top of the shared ones."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from services.ws_gateway.origins import parse_allowed_origins
from shared.settings import DRAIN_SPARE_S, DRAIN_STEP_TIMEOUTS, CommonSettings, url_of

# Any local port: what a developer's console runs on. The default also has the API's own
# origin, from LONGHAUL_API_HOST/PORT (see _origins_default).
LOCAL_ORIGINS = "http://localhost:*,http://127.0.0.1:*,http://[::1]:*"
# The default's stand-in until the API's address is known.
_API_AND_LOCAL = "<the API's own origin and any local port>"


class GatewaySettings(CommonSettings):
    # gateway_host and gateway_port: in CommonSettings (the API needs them too).
    # SDKs and servers send no Origin; browsers always do, and Cross-Site WebSocket
    # Hijacking needs a browser, so a missing Origin is no risk (the token still is).
    # (Before allowed_origins: its check reads this.)
    allow_missing_origin: bool = True
    # Comma-separated origins; "*" matches one host label or a port ("http://localhost:*").
    # Empty: no browser may connect (a gateway for servers and SDKs alone).
    allowed_origins: str = Field(default=_API_AND_LOCAL, validate_default=True)
    ping_interval_s: float = Field(default=20.0, gt=0)
    ping_timeout_s: float = Field(default=20.0, gt=0)
    max_frame_bytes: int = Field(default=65536, ge=1024)
    # Events a connection may have waiting before it counts as a slow consumer (when its
    # socket is full too; 16 times as many when it is not: see session.py).
    client_queue_size: int = Field(default=256, ge=1)
    max_subscriptions_per_connection: int = Field(default=1000, ge=1)
    # Across every gateway process (leases in Redis), and within each.
    max_connections_per_tenant: int = Field(default=1000, ge=1)
    # How long a connection's place counts after its gateway died without giving it back.
    connection_lease_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=20_000, ge=1)
    handshake_timeout_s: float = Field(default=10.0, gt=0)
    # How long closing a connection (the close handshake) may take before it is aborted;
    # also how long a client's socket may take nothing we wrote before it is dropped as
    # slow (its keepalive ping waits behind what it does not read).
    close_timeout_s: float = Field(default=5.0, gt=0)
    # When the database is ahead of the stream, the worker may simply not have written
    # the event yet (it commits first): wait this long before settling for a snapshot.
    snapshot_grace_s: float = Field(default=0.2, ge=0)
    # How often the rows of the watched tasks are compared with what their subscribers
    # got (sweep.py): the longest a client waits for an event that Redis never had.
    subscription_check_s: float = Field(default=5.0, gt=0)
    # How often the API keys of the open streams are checked (one query): the longest a
    # stream runs on after its key is revoked (revocation.py).
    revocation_check_s: float = Field(default=5.0, gt=0)
    # An SSE stream with nothing to send writes a comment this often: proxies close idle
    # responses, and a write is how a client that vanished is found.
    sse_heartbeat_s: float = Field(default=15.0, gt=0)
    # On SIGTERM, how long the gateway goes on serving, /readyz answering 503, before it
    # stops listening and closes its clients (1001): a load balancer that polls /readyz
    # takes it out of rotation meanwhile, so no client meets a closed port. The API's
    # setting of the same name, and its bounds. 0: it closes at once.
    stop_delay_s: float = Field(default=0.0, ge=0, le=300)

    @property
    def drain_bound_s(self) -> float:
        """How long a stopping gateway's drain may take before the process ends at once
        (shared.lifecycle.run): the stop delay, the clients' close (1001) and the wait
        for those dropped as not reading (close_timeout_s and a second each), and a
        step's timeouts for each of the rest (the loops' last turns, the leases, the
        readers, three connections), with room to spare. Generous, not exact: a drain
        it cuts ends as after a crash, and nothing is lost."""
        steps = 10
        return (
            self.stop_delay_s
            + 2 * (self.close_timeout_s + 1)
            + steps * DRAIN_STEP_TIMEOUTS * (self.io_timeout_s + 1)
            + DRAIN_SPARE_S
        )

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins_default(cls, value: object, info: ValidationInfo) -> object:
        # The contract's default: the API's own origin, wherever LONGHAUL_API_HOST/PORT
        # put it (validated above: in CommonSettings), and any local port.
        if value != _API_AND_LOCAL:
            return value
        api = url_of("http", info.data.get("api_host"), info.data.get("api_port"), 8000)
        return f"{api},{LOCAL_ORIGINS}"

    @field_validator("allowed_origins")
    @classmethod
    def _origins_parse(cls, value: str, info: ValidationInfo) -> str:
        # Raises ValueError with the bad entry.
        if not parse_allowed_origins(value) and not info.data.get("allow_missing_origin"):
            raise ValueError(
                "no origin listed and LONGHAUL_ALLOW_MISSING_ORIGIN is false: no client"
                " could connect"
            )
        return value
