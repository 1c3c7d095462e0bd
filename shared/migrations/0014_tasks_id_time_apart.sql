-- longhaul:no-transaction
-- GET /v1/tasks with a time window on created_at reads the range of ids whose time
-- (UUIDv7: Unix ms in the first 48 bits, the API's clock) is near the window, as
-- created_at (PostgreSQL's clock) is most often milliseconds from it. The tasks whose
-- two are more than a minute apart (clocks that disagree, an insert that waited, an id
-- of another kind) are read from this index, nearly empty. services/api/repository.py
-- repeats the predicate word for word, or PostgreSQL would not use the index.
DROP INDEX CONCURRENTLY IF EXISTS tasks_id_time_apart;
CREATE INDEX CONCURRENTLY tasks_id_time_apart ON tasks (tenant_id, id DESC)
    WHERE created_at
          - to_timestamp(('x' || translate(left(id::text, 13), '-', ''))::bit(48)::bigint
                         / 1000.0::float8)
          NOT BETWEEN interval '-1 minute' AND interval '1 minute';
