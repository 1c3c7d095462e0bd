-- Longhaul's first schema: tenants and keys, the task registry, tasks, the outbox,
-- dead letters. Every lookup the services make has an index named after it.

CREATE TABLE tenants (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    -- NULL: the deployment's default (LONGHAUL_RATE_LIMIT_PER_S / _BURST).
    rate_limit_per_s double precision CHECK (rate_limit_per_s > 0),
    rate_burst      integer CHECK (rate_burst > 0),
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- A key is "lh_<label>_<key_id>_<secret>"; only sha256(secret) is stored. The secret
-- is 32 random bytes, so a fast hash is enough (nothing to brute-force).
CREATE TABLE api_keys (
    key_id      text PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    label       text NOT NULL,
    secret_hash bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

-- Types the workers can run, registered by each worker at start; the API admits
-- only these and validates args against the JSON schema.
CREATE TABLE task_types (
    name        text PRIMARY KEY,
    args_schema jsonb NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    type            text NOT NULL,
    args            jsonb NOT NULL,
    state           text NOT NULL CHECK (state IN
                        ('queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled')),
    progress        double precision NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
    message         text,
    result          jsonb,
    error           jsonb,
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL,
    priority        integer NOT NULL DEFAULT 0,
    timeout_s       double precision NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz,
    last_seq        bigint NOT NULL DEFAULT 0,
    -- The worker running the current attempt and until when it holds it.
    worker_id       text,
    lease_expires_at timestamptz,
    cancel_requested_at timestamptz,
    idempotency_key text,
    request_hash    bytea,
    trace_id        text
);
-- GET /v1/tasks: newest first per tenant (UUIDv7 ids are time-ordered), with filters.
CREATE INDEX tasks_by_tenant ON tasks (tenant_id, id DESC);
CREATE INDEX tasks_by_tenant_state ON tasks (tenant_id, state, id DESC);
CREATE INDEX tasks_by_tenant_type ON tasks (tenant_id, type, id DESC);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The reaper's scan: running tasks whose lease ran out.
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE state = 'running';

-- Messages to publish. A row is written in the same transaction as the state it
-- announces and deleted only after the broker confirmed the publish.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    task_id      uuid NOT NULL,
    attempt      integer NOT NULL,
    body         bytea NOT NULL,
    available_at timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_due ON outbox (available_at, id);

CREATE TABLE dead_letters (
    id          uuid PRIMARY KEY,
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    task_id     uuid,
    reason      text NOT NULL,
    detail      text,
    body        bytea NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{}',
    attempts    integer,
    last_error  jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    redriven_at timestamptz
);
CREATE INDEX dead_letters_by_tenant ON dead_letters (tenant_id, created_at DESC);
