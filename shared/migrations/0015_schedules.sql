-- Periodic tasks: a schedule makes a task of its type and args each time its cron
-- expression (five fields, UTC) fires. Workers fire the due ones, each in the
-- transaction that stores its task (services/worker/maintenance.py, fire_schedules).
CREATE TABLE schedules (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    cron         text NOT NULL,
    type         text NOT NULL,
    args         jsonb NOT NULL DEFAULT '{}',
    priority     integer NOT NULL DEFAULT 0,
    -- NULL: at each fire, the type's own (@task(max_attempts=...)), else the default.
    max_attempts integer,
    timeout_s    double precision,
    enabled      boolean NOT NULL DEFAULT true,
    -- When it fires next; NULL while disabled (or while its cron cannot be read).
    next_run_at  timestamptz,
    -- The fire time of its last task, and that task (no foreign key: finished tasks
    -- are deleted after their retention, the schedule stays).
    last_run_at  timestamptz,
    last_task_id uuid,
    -- Why its last fire made no task (its type gone, its args refused); NULL once one does.
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When it was last created or changed (PATCH); fires do not count.
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_name UNIQUE (tenant_id, name)
);
-- The workers' scan: enabled schedules whose next fire has come.
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE enabled;
-- GET /v1/schedules: the tenant's newest first (UUIDv7 ids are time-ordered).
CREATE INDEX schedules_by_tenant ON schedules (tenant_id, id DESC);
