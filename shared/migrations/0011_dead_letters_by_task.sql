-- longhaul:no-transaction
-- A dead letter is kept once per message: RabbitMQ dead-letters at least once, and a
-- worker may die between its commit and its ack. Storing one looks for a waiting
-- letter of the same task first; dead letters can be many, those waiting few.
DROP INDEX CONCURRENTLY IF EXISTS dead_letters_waiting_by_task;
CREATE INDEX CONCURRENTLY dead_letters_waiting_by_task ON dead_letters (task_id)
    WHERE redriven_at IS NULL;
