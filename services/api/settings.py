"""API settings (``LONGHAUL_*`` env vars) on top of the shared ones."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from shared.settings import DRAIN_SPARE_S, DRAIN_STEP_TIMEOUTS, CommonSettings

# How long a stopping API waits for the requests in flight (aiohttp's site shutdown).
SHUTDOWN_TIMEOUT_S = 10.0


class ApiSettings(CommonSettings):
    # api_host and api_port: in CommonSettings (the gateway admits the API's origin).
    # Largest request body; larger ones get 413 before they are read.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Back pressure: above this many ready messages, submissions get 503.
    max_queue_depth: int = Field(default=100_000, ge=1)
    # Back pressure on the store of scheduled work: above this many outbox rows not yet
    # due (delayed tasks, and retries waiting out their backoff), submissions carrying a
    # delay get 503. Each is a task row and an outbox row in PostgreSQL, a few KB at most,
    # so 100,000 is some hundreds of MB; counting up to it takes ~15 ms, once a second.
    max_delayed_tasks: int = Field(default=100_000, ge=1)
    # How often the queue depth is sampled (not asked per request).
    queue_depth_refresh_s: float = Field(default=0.25, gt=0)
    # Per-tenant token bucket shared by all API processes (Redis); 0 disables it.
    rate_limit_per_s: float = Field(default=200.0, ge=0)
    rate_limit_burst: int = Field(default=400, ge=1)
    # Schedules one tenant may have: each fires tasks that no rate limit or back
    # pressure of the API's refuses (they go straight to the outbox), so without a cap
    # one tenant's 429s could be turned into unbounded every-minute tasks.
    max_schedules_per_tenant: int = Field(default=1000, ge=1)
    ws_token_ttl_s: float = Field(default=60.0, gt=0, le=3600)
    # A task token opens its task's SSE stream again and again (an EventSource's own
    # reconnects): it should outlast the task's connection losses, and bounds how long
    # a leaked URL shows that task's progress.
    task_token_ttl_s: float = Field(default=3600.0, gt=0, le=24 * 3600)
    # How long an API key lookup (or a miss) is cached; bounds how long a revoked key
    # keeps working.
    auth_cache_s: float = Field(default=5.0, ge=0)
    # How often the registry of task types is re-read from PostgreSQL.
    task_types_refresh_s: float = Field(default=5.0, gt=0)
    # Also publish the outbox from this process (it normally does).
    relay_enabled: bool = True
    # How long a fresh task's outbox row stays claimed by the API process that inserted
    # it and publishes it at once; should that process die first, any relay publishes it
    # once the claim lapses. Its publish and its deletion take up to io_timeout_s each,
    # and rows waiting longer than the rest of the claim are left to the other relays.
    handoff_claim_s: float = Field(default=15.0, gt=0)
    # Database pool size of one API process.
    db_pool_size: int = Field(default=10, ge=1, le=200)
    # On SIGTERM, how long the API goes on serving, /readyz answering 503, before it
    # stops listening: a load balancer that polls /readyz takes it out of rotation
    # meanwhile, so no request meets a closed port. 0: it stops listening at once.
    stop_delay_s: float = Field(default=0.0, ge=0, le=300)

    @field_validator("handoff_claim_s")
    @classmethod
    def _claim_outlasts_a_publish(cls, value: float, info: ValidationInfo) -> float:
        timeout = info.data.get("io_timeout_s")
        if timeout is not None and value < 3 * timeout:
            raise ValueError(
                f"must be at least 3 times LONGHAUL_IO_TIMEOUT_S ({timeout:g}): a publish and "
                "a deletion take up to that each, and the claim must outlast both"
            )
        return value

    @property
    def drain_bound_s(self) -> float:
        """How long a stopping API's drain may take before the process ends at once
        (shared.lifecycle.run): the stop delay, the requests in flight (aiohttp waits
        SHUTDOWN_TIMEOUT_S, cancels them and waits as long again, each rounded up to a
        second), and a step's timeouts for each of the rest (the loops' last turns, up
        to six statements a relay's, the writers, three connections), with room to
        spare. Generous, not exact: a drain it cuts ends as after a crash, and nothing
        is lost."""
        steps = 12
        return (
            self.stop_delay_s
            + 2 * (SHUTDOWN_TIMEOUT_S + 1)
            + steps * DRAIN_STEP_TIMEOUTS * (self.io_timeout_s + 1)
            + DRAIN_SPARE_S
        )

    def warnings(self) -> list[str]:
        """What this configuration allows but an operator most likely did not mean,
        logged at start. Not refused: a test (or a drill) may want the case."""
        out = []
        if self.max_queue_depth >= self.queue_max_length:
            # The broker's x-max-length then refuses publishes of tasks the API has
            # already answered 202 for (the relay retries them) before the API pushes back.
            out.append(
                f"LONGHAUL_MAX_QUEUE_DEPTH ({self.max_queue_depth}) is not below"
                f" LONGHAUL_QUEUE_MAX_LENGTH ({self.queue_max_length}): the broker's last guard"
                " will refuse publishes before the API pushes back with 503"
            )
        return out
