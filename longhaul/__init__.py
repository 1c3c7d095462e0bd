"""Longhaul for Python applications: ``Client`` submits tasks to a Longhaul API and
follows them; ``SyncClient`` does the same for synchronous code. (Task handlers are
written with ``services.worker.sdk``.)"""

from longhaul.client import Client, LonghaulError, RetryPolicy
from longhaul.sync import SyncClient

__all__ = ["Client", "LonghaulError", "RetryPolicy", "SyncClient"]
