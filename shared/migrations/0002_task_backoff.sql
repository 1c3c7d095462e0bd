-- A task may carry its own retry backoff (base_s, factor, cap_s), overriding its
-- type's and the worker's defaults.
ALTER TABLE tasks ADD COLUMN backoff jsonb;
