-- The task's priority beside its message, so that a relay routes the message to its
-- lane (shared/wire.py HIGH_PRIORITY) without parsing bodies or joining tasks. The
-- priority rather than the lane: the threshold stays code. A constant default: adding
-- it rewrites nothing, and rows of processes not yet upgraded go to the normal lane,
-- where every message went before.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
