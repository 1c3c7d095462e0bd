-- longhaul:no-transaction
-- The index of running tasks' leases (for the reaper) was partial on state 'running':
-- the success, failure, progress and renewal statements, which also say
-- state = 'running', then read it whole (every running task's entry, for the one
-- task they change) whenever the statistics knew of few running tasks. Partial on the
-- lease itself, it still serves the reaper (lease_expires_at < now() implies it is set:
-- only running tasks hold a lease) and no longer matches those statements.
DROP INDEX CONCURRENTLY IF EXISTS tasks_lease_expiry;
CREATE INDEX CONCURRENTLY tasks_lease_expiry ON tasks (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
DROP INDEX CONCURRENTLY IF EXISTS tasks_leases;
