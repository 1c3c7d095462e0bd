-- Which worker runs which type, as each says at start and with its lease heartbeat
-- (task_types.seen_at: when any did, which workers not yet upgraded still read). A
-- worker that stops cleanly deletes its rows, and clears seen_at of the types no other
-- worker said it runs within a lease: their tasks fail as unknown_type at once instead
-- of being passed on for a lease. Rows of a worker that died are pruned by the others.
CREATE TABLE IF NOT EXISTS task_type_workers (
    type      text NOT NULL,
    worker_id text NOT NULL,
    seen_at   timestamptz NOT NULL,
    PRIMARY KEY (type, worker_id)
);
