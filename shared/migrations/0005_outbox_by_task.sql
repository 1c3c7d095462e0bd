-- Cancelling a task deletes its scheduled message by task id: without an index that
-- read the whole outbox, which holds every delayed task's message until it is due.
CREATE INDEX outbox_by_task ON outbox (task_id);
