-- longhaul:no-transaction
-- Cancelling a task deletes its scheduled message by task id: without an index that
-- read the whole outbox, which holds every delayed task's message until it is due.
DROP INDEX CONCURRENTLY IF EXISTS outbox_by_task;
CREATE INDEX CONCURRENTLY outbox_by_task ON outbox (task_id);
