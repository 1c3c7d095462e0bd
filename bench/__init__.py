"""Longhaul's benchmark suite (GitHub issue #6): ``python -m bench [--quick]``.

Every scenario starts what it measures as real processes against the local RabbitMQ,
Redis and PostgreSQL, under a private namespace and database that are removed after."""
