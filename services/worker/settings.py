"""Worker settings (``LONGHAUL_*`` env vars) on top of the shared ones."""

from __future__ import annotations

from pydantic import Field

from shared.settings import DRAIN_SPARE_S, DRAIN_STEP_TIMEOUTS, CommonSettings


class WorkerSettings(CommonSettings):
    # Tasks run at once by one worker process; also the AMQP prefetch.
    worker_concurrency: int = Field(default=16, ge=1, le=10_000)
    # Run slots beyond those for the high lane's tasks only (priority >= 5): so many of
    # them start at once however busy normal tasks keep the worker. 0: the high lane
    # only goes first for the shared slots.
    worker_high_reserved: int = Field(default=1, ge=0, le=10_000)
    # How long a stopping worker lets running tasks finish before handing them back.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # How long a cancelled handler may take to stop before it is abandoned.
    cancel_grace_s: float = Field(default=5.0, ge=0)
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=8002, ge=0, le=65535)
    # At most this many progress events per second per task reach Redis.
    progress_max_rate_per_s: float = Field(default=20.0, gt=0)
    # An attempt's `running` event waits this long for its first progress report or its
    # outcome, and goes to Redis with it: a short task costs one event write, not two.
    start_event_delay_s: float = Field(default=0.02, ge=0, le=5)
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_factor: float = Field(default=2.0, ge=1)
    retry_cap_s: float = Field(default=600.0, ge=0)
    # Whether an attempt that ran past its task's timeout_s is retried (while attempts
    # remain) or fails the task at once.
    retry_on_timeout: bool = True
    # Finished tasks (succeeded, failed, cancelled) are deleted this long after they
    # finished; 0 keeps them forever.
    task_retention_s: float = Field(default=7 * 24 * 3600, ge=0)
    # Also publish the outbox (retries, delayed tasks) from this process.
    relay_enabled: bool = True
    # How often (jittered: half to all of it) this worker looks for schedules that are
    # due: a task is made within about this long after its fire time.
    schedule_poll_s: float = Field(default=5.0, gt=0, le=3600)

    @property
    def drain_bound_s(self) -> float:
        """How long a stopping worker's drain may take before the process ends at once
        (shared.lifecycle.run): the running tasks' grace and their hand-back (the cancel
        grace and two steps), the abandoned handlers' last grace and their hand-back, and
        a step's timeouts for each of the rest (the consumers' cancels, the dead letters,
        the loops' last turns, up to six statements a relay's, the writers, two
        channels, the health server, three connections), with room to spare. Generous,
        not exact: a drain it cuts ends as after a crash, and nothing is lost."""
        steps = 24
        return (
            self.shutdown_grace_s
            + 2 * self.cancel_grace_s
            + steps * DRAIN_STEP_TIMEOUTS * (self.io_timeout_s + 1)
            + DRAIN_SPARE_S
        )

    def warnings(self) -> list[str]:
        """What this configuration allows but an operator most likely did not mean,
        logged at start. Not refused: the fault tests want short leases."""
        # A renewal may take up to the I/O timeout (and a second) and succeed; the next
        # comes a third of a lease later, and a handler is stopped at 90% of one.
        if self.lease_s < 2 * (self.io_timeout_s + 1):
            return [
                f"LONGHAUL_LEASE_S ({self.lease_s:g}) is under twice LONGHAUL_IO_TIMEOUT_S"
                f" + 1 s ({2 * (self.io_timeout_s + 1):g}): a database that answers slowly,"
                " within its timeout, can let leases lapse and stop running handlers"
            ]
        return []
