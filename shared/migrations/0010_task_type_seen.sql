-- When a worker running the type last said so: each worker refreshes its types with its
-- lease heartbeat. A worker that lacks a type hands its tasks back while another one
-- runs it (a rolling deploy adding a type), and fails them once none has for a lease.
-- Nullable, no default: adding it rewrites nothing.
ALTER TABLE task_types ADD COLUMN IF NOT EXISTS seen_at timestamptz;
