-- longhaul:no-transaction
-- Finished tasks are deleted once they are older than the retention (the workers'
-- purge, oldest first): an index of the finished ones by when they finished.
DROP INDEX CONCURRENTLY IF EXISTS tasks_finished;
CREATE INDEX CONCURRENTLY tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
