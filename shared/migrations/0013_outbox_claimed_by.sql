-- Which process claimed a handed-over row: a key of its relay, which holds a session
-- advisory lock on it while it lives (shared/relay.py). A row whose claimer's lock is
-- gone (the process died) is released to every relay at once, not when its claim
-- lapses. Rows of processes not yet upgraded have none and wait for the lapse, as before.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claimed_by integer;
