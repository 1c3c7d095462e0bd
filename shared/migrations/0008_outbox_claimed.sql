-- A first attempt's row is inserted claimed by the API process that inserted it, which
-- publishes it from memory right after the commit; other relays take it only once the
-- claim has lapsed (that process died or gave up on it). Nullable, no default: adding
-- it rewrites nothing.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS claimed_until timestamptz;
