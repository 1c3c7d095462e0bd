-- What a task type's @task(max_attempts=..., timeout_s=...) gives the tasks that do not
-- set their own: the worker registers them with the type, the API applies them at
-- insert. Nullable, no default: adding them rewrites nothing.
ALTER TABLE task_types ADD COLUMN IF NOT EXISTS max_attempts integer;
ALTER TABLE task_types ADD COLUMN IF NOT EXISTS timeout_s double precision;
