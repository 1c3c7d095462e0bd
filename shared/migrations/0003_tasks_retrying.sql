-- longhaul:no-transaction
-- The relay's promotion of due retries looks up tasks in state 'retrying'. Without an
-- index it scanned the whole table on every flush (13 ms at 54,000 tasks, growing with
-- the table); the retrying tasks are few, so this index stays small.
DROP INDEX CONCURRENTLY IF EXISTS tasks_retrying;
CREATE INDEX CONCURRENTLY tasks_retrying ON tasks (id) WHERE state = 'retrying';
